; cpustate: the oracle of a VP's processor state (cpustate.inc says what it sets and checks): 64
; checks with 16384 NOPs between, about 1.2 million instructions and 960 VM exits a VP.
%define ROUNDS 64
%define SLED_NOPS 16384
%include "cpustate.inc"
