; Solution of exercise 10: the check restored in hypervisors/common/service.inc, receive_verify,
; after the comparison of the digests (repe cmpsb). finding.json: 10-finding.json.

; E#10-1
    mov eax, REPLY_DIGEST
    jne inverse_reply
