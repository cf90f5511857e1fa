; cpustate_long: cpustate (cpustate.inc) with a long life, for many restarts in a row: 300 checks
; with 262144 NOPs between, about 80 million instructions a VP.
%define ROUNDS 300
%define SLED_NOPS 262144
%include "cpustate.inc"
