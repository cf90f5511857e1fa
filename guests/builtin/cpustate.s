; cpustate: the oracle of a VP's processor state (cpustate.inc says what it sets and checks): 64
; checks with 65536 NOPs between, about 4.3 million instructions and 960 VM exits a VP.
%define ROUNDS 64
%define SLED_NOPS 65536
%include "cpustate.inc"
