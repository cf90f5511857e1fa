; blkirq: blkirq.inc's interrupt-driven stream of checksummed blocks, 48 rounds.
%define ROUNDS 48
%define GUEST_NAME "blkirq"
%include "blkirq.inc"
