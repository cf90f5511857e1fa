; cpustate_long: cpustate (cpustate.inc) with a long life, for many restarts in a row: 1200 checks
; with 65536 NOPs between, about 80 million instructions a VP.
%define ROUNDS 1200
%define SLED_NOPS 65536
%include "cpustate.inc"
