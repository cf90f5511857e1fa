; Solution of exercise 10: the check restored in hypervisors/common/service.inc, receive_verify,
; after the comparison of the digests (repe cmpsb). finding.json is what your campaign found
; (the project's tests make one as the fuzzer would: tools/lab/fuzz_run.py, write_planted_finding).

; E#10-1
    mov eax, REPLY_DIGEST
    jne inverse_reply
