; cpustate: the oracle of a VP's processor state (cpustate.inc says what it sets and checks): 200
; checks, about 1.6 million instructions a VP.
%define ROUNDS 200
%define SLED_NOPS 4096
%include "cpustate.inc"
