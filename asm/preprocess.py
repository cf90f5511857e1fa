"""The toolkit's preprocessor: %include, %define, %macro, constants and vmcallr, down to keystone statements."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping, Sequence

from .errors import AsmError, SourceLocation
from .isa import VMCALLR_MNEMONIC, VMCALLR_OPCODE
from .syntax import (
    DIRECTIVE_HINTS,
    IDENTIFIER,
    JUMP_SIZE_KEYWORDS,
    SUPPORTED_DIRECTIVES,
    first_word,
    format_number,
    identifiers,
    is_assignment,
    is_register_or_keyword,
    replace_identifiers,
    split_first_word,
    split_instruction,
    split_labels,
    strip_comment,
    tokens,
)

EMPTY, DIRECTIVE, INSTRUCTION = "empty", "directive", "instruction"
RESERVED_LABEL_PREFIX = "__hhr_"  # the assembler's own marker labels
MAX_MACRO_DEPTH = 32
MAX_DEFINE_DEPTH = 32
_MACRO_REFERENCE = re.compile(r"%(%?)([A-Za-z_]\w*)")
_PREPROCESSOR_DIRECTIVES = ("%include", "%define", "%macro", "%endmacro")
_VMCALLR_BYTES = ".byte " + ", ".join(f"0x{byte:02x}" for byte in VMCALLR_OPCODE)


@dataclass(frozen=True)
class Statement:
    """One line for keystone: its labels, its body after preprocessing, and where it came from."""

    labels: tuple[str, ...]
    body: str
    kind: str  # EMPTY (labels only), DIRECTIVE or INSTRUCTION
    location: SourceLocation

    @property
    def text(self) -> str:
        return "".join(f"{label}: " for label in self.labels) + self.body

    @property
    def writes_rip(self) -> bool:
        """True when the source spelled out `rip` (an intended RIP-relative operand)."""
        return any(name.lower() == "rip" for name in identifiers(self.body))


@dataclass(frozen=True)
class Program:
    """The preprocessed source: statements in order, labels with where each is defined."""

    statements: tuple[Statement, ...]
    labels: dict[str, SourceLocation]
    # For each statement, the labels its operands name (used by the encoding checks).
    label_references: tuple[tuple[str, ...], ...]


@dataclass
class _Macro:
    name: str
    parameters: tuple[str, ...]
    location: SourceLocation
    directory: Path | None
    body: list[tuple[str, SourceLocation]] = field(default_factory=list)


@dataclass(frozen=True)
class _Define:
    text: str
    location: SourceLocation


def preprocess(
    source: str,
    *,
    filename: str = "<source>",
    constants: Mapping[str, int] | None = None,
    include_dirs: Sequence[Path] = (),
) -> Program:
    """Expand includes, macros, defines and constants; return statements ready for keystone."""
    preprocessor = _Preprocessor(constants or {}, [Path(d) for d in include_dirs])
    directory = None
    if not filename.startswith("<"):
        path = Path(filename)
        directory = path.parent
        preprocessor.include_chain.append(path.resolve())
    preprocessor.process_file(source, filename, directory, ())
    return preprocessor.finish()


def _validate_constants(constants: Mapping[str, int]) -> dict[str, str]:
    rendered = {}
    for name, value in constants.items():
        if not isinstance(name, str) or not IDENTIFIER.match(name):
            raise AsmError(f"constant name {name!r} is not an identifier")
        if is_register_or_keyword(name):
            raise AsmError(f"constant {name!r} has the name of a register or operand keyword")
        if isinstance(value, bool) or not isinstance(value, int):
            raise AsmError(f"constant {name} must be an int, got {type(value).__name__}")
        if not -(1 << 63) <= value < (1 << 64):
            raise AsmError(f"constant {name} = {value:#x} does not fit in 64 bits")
        rendered[name] = format_number(value)
    return rendered


def _split_arguments(text: str) -> list[str]:
    """Split macro arguments at commas that are not inside brackets, parentheses or strings."""
    if not text.strip():
        return []
    arguments, depth, start = [], 0, 0
    for kind, token, position, _ in tokens(text):
        if kind != "other":
            continue
        if token in "([{":
            depth += 1
        elif token in ")]}":
            depth -= 1
        elif token == "," and depth == 0:
            arguments.append(text[start:position].strip())
            start = position + 1
    arguments.append(text[start:].strip())
    return arguments


class _Preprocessor:
    def __init__(self, constants: Mapping[str, int], include_dirs: list[Path]):
        self.constants = _validate_constants(constants)
        self.include_dirs = include_dirs
        self.include_chain: list[Path] = []
        self.defines: dict[str, _Define] = {}
        self.macros: dict[str, _Macro] = {}
        self.expansion_count = 0
        self.statements: list[Statement] = []
        self.labels: dict[str, SourceLocation] = {}

    # --- files and lines ---------------------------------------------------------------------

    def process_file(self, text: str, file_label: str, directory: Path | None, context: tuple[str, ...]):
        collecting: _Macro | None = None
        for number, raw in enumerate(text.splitlines(), 1):
            location = SourceLocation(file_label, number, raw, context)
            line = strip_comment(raw)
            word = first_word(line.strip()).lower()
            if collecting is not None:
                if word == "%endmacro":
                    self.macros[collecting.name] = collecting
                    collecting = None
                elif word == "%macro":
                    raise AsmError("%macro inside a macro definition (missing %endmacro?)", location)
                else:
                    collecting.body.append((line, location))
            elif word == "%macro":
                collecting = self.begin_macro(line, location, directory)
            else:
                self.process_line(line, location, directory, 0)
        if collecting is not None:
            raise AsmError(f"macro {collecting.name} has no %endmacro", collecting.location)

    def process_line(self, line: str, location: SourceLocation, directory: Path | None, depth: int):
        stripped = line.strip()
        if not stripped:
            return
        if stripped.startswith("%"):
            self.directive(stripped, location, directory)
            return
        labels, body = split_labels(line)
        for label in labels:
            self.define_label(label, location)
        macro = self.macros.get(first_word(body))
        if macro is not None:
            if labels:
                self.statements.append(Statement(tuple(labels), "", EMPTY, location))
            self.expand(macro, body[len(macro.name):], location, depth)
            return
        body = self.substitute(body, location)
        mnemonic, operands = split_first_word(body)
        if mnemonic.lower() == VMCALLR_MNEMONIC:
            if operands:
                raise AsmError(f"{VMCALLR_MNEMONIC} takes no operands", location)
            body = _VMCALLR_BYTES
            kind = INSTRUCTION
        else:
            kind = self.classify(body, location)
        if not body.isascii():
            raise AsmError("non-ASCII character (keystone reads ASCII only)", location)
        self.statements.append(Statement(tuple(labels), body, kind, location))

    def classify(self, body: str, location: SourceLocation) -> str:
        if not body:
            return EMPTY
        if body.startswith("."):
            directive = first_word(body).lower()
            if directive in DIRECTIVE_HINTS:
                raise AsmError(f"{directive} is not supported: {DIRECTIVE_HINTS[directive]}", location)
            if directive not in SUPPORTED_DIRECTIVES:
                supported = " ".join(sorted(SUPPORTED_DIRECTIVES))
                raise AsmError(f"unsupported directive {directive} (supported: {supported})", location)
            return DIRECTIVE
        if is_assignment(body):
            raise AsmError("symbol assignment (NAME = value) is not supported: use %define NAME value", location)
        return INSTRUCTION

    def define_label(self, label: str, location: SourceLocation):
        if is_register_or_keyword(label):
            raise AsmError(f"label {label!r} has the name of a register or operand keyword", location)
        if label.startswith(RESERVED_LABEL_PREFIX):
            raise AsmError(f"labels starting with {RESERVED_LABEL_PREFIX} are reserved for the assembler", location)
        if label in self.constants:
            raise AsmError(f"label {label!r} has the name of a constant", location)
        if label in self.defines:
            raise AsmError(f"label {label!r} has the name of a %define (at {self.defines[label].location})", location)
        if label in self.labels:
            raise AsmError(f"label {label!r} is already defined at {self.labels[label]}", location)
        self.labels[label] = location

    def substitute(self, body: str, location: SourceLocation) -> str:
        """Replace %define names (textually, repeatedly) and constants (by their value)."""
        for _ in range(MAX_DEFINE_DEPTH):
            replaced_define = False

            def replacement(name: str) -> str | None:
                nonlocal replaced_define
                if name in self.defines:
                    replaced_define = True
                    return self.defines[name].text
                return self.constants.get(name)

            body = replace_identifiers(body, replacement)
            if not replaced_define:
                return body
        raise AsmError("%define expansion does not end (a define that refers to itself?)", location)

    # --- directives ----------------------------------------------------------------------------

    def directive(self, stripped: str, location: SourceLocation, directory: Path | None):
        word, argument = split_first_word(stripped)
        word = word.lower()
        if word == "%include":
            self.include(argument, location, directory)
        elif word == "%define":
            self.define(argument, location)
        elif word == "%endmacro":
            raise AsmError("%endmacro without %macro", location)
        else:
            known = ", ".join(_PREPROCESSOR_DIRECTIVES)
            raise AsmError(f"unknown preprocessor directive {word} (known: {known})", location)

    def define(self, argument: str, location: SourceLocation):
        name, value = split_first_word(argument)
        if not IDENTIFIER.match(name) or not value:
            raise AsmError("expected %define NAME value", location)
        if is_register_or_keyword(name):
            raise AsmError(f"%define {name}: the name of a register or operand keyword", location)
        if name in self.constants:
            raise AsmError(f"%define {name}: already a constant passed to the assembler", location)
        if name in self.labels:
            raise AsmError(f"%define {name}: already a label (at {self.labels[name]})", location)
        if name in self.defines:
            raise AsmError(f"%define {name}: already defined at {self.defines[name].location}", location)
        self.defines[name] = _Define(value, location)

    def include(self, argument: str, location: SourceLocation, directory: Path | None):
        match = re.fullmatch(r'"([^"]+)"', argument)
        if match is None:
            raise AsmError('expected %include "file"', location)
        name = match.group(1)
        searched = ([directory] if directory is not None else []) + self.include_dirs
        for candidate_directory in searched:
            path = candidate_directory / name
            if path.is_file():
                break
        else:
            where = ", ".join(str(d) for d in searched) or "no directories"
            raise AsmError(f'cannot find include file "{name}" (searched {where})', location)
        resolved = path.resolve()
        if resolved in self.include_chain:
            cycle = " -> ".join(p.name for p in self.include_chain[self.include_chain.index(resolved):])
            raise AsmError(f"include cycle: {cycle} -> {path.name}", location)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise AsmError(f'cannot read include file "{path}": {error}', location) from None
        self.include_chain.append(resolved)
        try:
            note = f"file included from {location}"
            self.process_file(text, str(path), path.parent, location.expansions + (note,))
        finally:
            self.include_chain.pop()

    # --- macros --------------------------------------------------------------------------------

    def begin_macro(self, line: str, location: SourceLocation, directory: Path | None) -> _Macro:
        header = line.strip()[len("%macro"):].strip()
        name, parameter_text = split_first_word(header)
        if not IDENTIFIER.match(name):
            raise AsmError("expected %macro NAME [param, ...]", location)
        if is_register_or_keyword(name):
            raise AsmError(f"macro {name}: the name of a register or operand keyword", location)
        if name in self.macros:
            raise AsmError(f"macro {name} is already defined at {self.macros[name].location}", location)
        parameters = tuple(_split_arguments(parameter_text))
        for parameter in parameters:
            if not re.fullmatch(r"[A-Za-z_]\w*", parameter):
                raise AsmError(f"macro {name}: parameter {parameter!r} is not a plain name", location)
        if len(set(parameters)) != len(parameters):
            raise AsmError(f"macro {name}: a parameter name is repeated", location)
        return _Macro(name, parameters, location, directory)

    def expand(self, macro: _Macro, argument_text: str, location: SourceLocation, depth: int):
        if depth >= MAX_MACRO_DEPTH:
            raise AsmError(f"macros nested more than {MAX_MACRO_DEPTH} deep (a macro that invokes itself?)", location)
        arguments = _split_arguments(argument_text)
        if len(arguments) != len(macro.parameters) or any(not argument for argument in arguments):
            expected = ", ".join(macro.parameters) or "no arguments"
            raise AsmError(
                f"macro {macro.name} takes {len(macro.parameters)} argument(s) ({expected}), got {len(arguments)}",
                location,
            )
        self.expansion_count += 1
        values = dict(zip(macro.parameters, arguments))
        unique = f"{macro.name}.{self.expansion_count}"
        note = f"macro {macro.name} invoked at {location}"
        for body_line, body_location in macro.body:
            expanded_location = SourceLocation(
                body_location.file, body_location.line, body_location.text, location.expansions + (note,)
            )

            def substitute_parameter(match: re.Match) -> str:
                local, name = match.group(1), match.group(2)
                if local:
                    return f"{unique}.{name}"
                if name in values:
                    return values[name]
                if f"%{name.lower()}" in _PREPROCESSOR_DIRECTIVES and body_line.lstrip().startswith(match.group()):
                    return match.group()
                raise AsmError(f"macro {macro.name} has no parameter %{name}", expanded_location)

            text = _MACRO_REFERENCE.sub(substitute_parameter, body_line)
            self.process_line(text, replace(expanded_location, expanded=text), macro.directory, depth + 1)

    # --- the whole program ---------------------------------------------------------------------

    def finish(self) -> Program:
        references = tuple(self.check_names(statement) for statement in self.statements)
        return Program(tuple(self.statements), dict(self.labels), references)

    def check_names(self, statement: Statement) -> tuple[str, ...]:
        """Every identifier in an operand must be a label, a register or a keyword: keystone would
        otherwise take some unknown names as 0 (`.space UNKNOWN`) or hang (`.fill UNKNOWN, 1, 0`)."""
        if statement.kind == EMPTY:
            return ()
        if statement.kind == INSTRUCTION:
            _, operands = split_instruction(statement.body)
        else:
            # String literals (.ascii "...") are skipped by the tokenizer.
            _, operands = split_first_word(statement.body)
        referenced = []
        for name in identifiers(operands):
            if name in self.labels:
                referenced.append(name)
            elif not is_register_or_keyword(name):
                raise AsmError(self.unknown_name_message(name), statement.location)
        return tuple(referenced)

    def unknown_name_message(self, name: str) -> str:
        message = f"unknown identifier {name!r}: not a label, register, constant or %define"
        if name == "$":
            return message + " (write . for the current address)"
        if name.lower() in JUMP_SIZE_KEYWORDS:
            return message + " (keystone chooses jump sizes itself: leave it out)"
        if name in self.defines:
            return message + f" here (it is %defined later, at {self.defines[name].location})"
        known = list(self.labels) + list(self.constants) + list(self.defines)
        near = [candidate for candidate in known if candidate.lower() == name.lower()]
        if near:
            return message + f" (did you mean {near[0]}?)"
        return message
