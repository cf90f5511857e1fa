; blkstream: the stream of checksummed blocks (blkstream.inc) through the block device assigned to it
; (`--guest blkstream,device=blkN`), each round's completion awaited by polling HEAD.
%include "blkbuffers.inc"
%include "blkstream.inc"

no_device:
    lea rsi, [rip + text_no_device]
    jmp failed

; Nothing to prepare, nothing to add to the report, the same buffers every round.
stream_setup:
stream_report:
begin_round:
    clc
    ret

wait_round:
    jmp wait_head

%include "device.inc"
%include "console.inc"

text_name:
    .asciz "blkstream"
