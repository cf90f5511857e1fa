"""The assembler toolkit: keystone plus our preprocessor, layouts as constants, symbols and disassembly."""

from .assembler import assemble, assemble_file
from .disasm import Instruction, decode, listing
from .errors import AsmError, SourceLocation, SymbolNotFound
from .image import Image, LineEntry
from .isa import VMCALLR_MNEMONIC, VMCALLR_OPCODE
from .layout import LayoutError, Struct, merge_constants
from .preprocess import preprocess

__all__ = [
    "AsmError",
    "Image",
    "Instruction",
    "LayoutError",
    "LineEntry",
    "SourceLocation",
    "Struct",
    "SymbolNotFound",
    "VMCALLR_MNEMONIC",
    "VMCALLR_OPCODE",
    "assemble",
    "assemble_file",
    "decode",
    "listing",
    "merge_constants",
    "preprocess",
]
