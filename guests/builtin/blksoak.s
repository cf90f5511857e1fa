; blksoak: blkirq.inc's interrupt-driven stream of checksummed blocks with a long life, for many hot
; restarts in a row while its device is busy: 1200 rounds. Beside blkstream and counter on 2 LPs, a
; restart without guest-memory hashing takes about 3.9 million ticks and 50 back to back leave it
; about 770 rounds in, so it outlives them with room to spare (tests/test_device_soak.py).
%define ROUNDS 1200
%define GUEST_NAME "blksoak"
%include "blkirq.inc"
