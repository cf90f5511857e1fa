/*
 * The machine's instruction recorder, in C: hooks on every Unicorn instance that, while a trace
 * window is open, write one compact record per instruction (its LP, context, clock, address, the
 * registers it changed, the memory it wrote and, when asked, read) to a trace file, beside the
 * machine's events, which Python hands over as opaque data records (docs/tracing.md, "The trace
 * file"). Everything readable (text, JSON Lines, Tenet, Chrome, Parquet) is rendered from the file.
 *
 * An instruction is complete when the next one begins, on any LP (its registers after are read
 * then), or when Python ends the recording (hhr_trace_finish). The events published meanwhile (an
 * I/O instruction's, the VM exit a guest instruction causes, those of an instruction the machine
 * carries out itself) come before its effects are all done: their data records wait behind it, so
 * the file has the instruction, complete, then its events.
 */
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

#include "tracepath.h"

#define TRACE_PAGE_SIZE 4096ULL
#define TRACE_PAGE_OFFSET_MASK (TRACE_PAGE_SIZE - 1)
#define WORD_BYTES 8                  /* Unicorn reports the value of a write of up to 8 bytes */
#define INSTRUCTION_HEAD_BYTES 12
#define LOAD_HEAD_BYTES 20
#define CODE_HEAD_BYTES 16
#define DATA_HEAD_BYTES 8
#define BIND_BYTES 16
#define ALL_REGISTERS ((1U << HHR_TRACE_REGISTERS) - 1)
#define MEMORY_ENTRY_HEAD_BYTES 12    /* u64 address, u32 length */
#define MEMORY_LIST_HEAD_BYTES 8      /* u32 entries, u32 bytes that follow */
#define HASH_MULTIPLIER 0x9E3779B97F4A7C15ULL
#define HASH_SHIFT 32
#define READ_BYTES_MAX 512            /* the widest single load Unicorn reports (FXRSTOR's area) */
_Static_assert(HHR_TRACE_CODE_WORDS == 2 && HHR_TRACE_CODE_WORDS * WORD_BYTES >= HHR_TRACE_CODE_BYTES,
               "write_code compares an instruction's bytes as two words");

/* Python's answers, through cffi (fastpath_build.py). */
static int hhr_on_trace_vmcs(int python_id, uint32_t lp, uint64_t vmcs);
static void hhr_on_trace_lp_done(int python_id, uint32_t lp);

/* --- the output buffer ------------------------------------------------------------------------- */
/* The file is written by a thread of its own: a full buffer is handed to it and the recorder goes
 * on filling the other one, so the machine does not wait for write(2) (the kernel's copy into the
 * page cache is a good part of recording's cost). One buffer at most is in its hands, so the
 * records reach the file in the order they were made. */
typedef struct {
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t changed;
    uint8_t *spare;                   /* the buffer not being filled: the thread's while it writes */
    uint64_t job_length;              /* bytes of `spare` to write; 0: the thread is idle */
    int stopping;
} trace_writer;

static void write_all(hhr_trace *t, const uint8_t *data, uint64_t length) {
    uint64_t done = 0;
    while (done < length) {
        ssize_t wrote = write(t->fd, data + done, length - done);
        if (wrote < 0) {
            if (errno == EINTR) continue;
            if (!t->error) t->error = errno;
            break;
        }
        done += (uint64_t)wrote;
    }
    t->bytes_written += done;
}

static void *writer_main(void *argument) {
    hhr_trace *t = argument;
    trace_writer *w = t->writer;
    pthread_mutex_lock(&w->lock);
    for (;;) {
        while (w->job_length == 0 && !w->stopping) pthread_cond_wait(&w->changed, &w->lock);
        if (w->job_length == 0) break;   /* stopping, nothing left */
        uint64_t length = w->job_length;
        pthread_mutex_unlock(&w->lock);
        write_all(t, w->spare, length);   /* t->error and t->bytes_written: the thread's until idle */
        pthread_mutex_lock(&w->lock);
        w->job_length = 0;
        pthread_cond_broadcast(&w->changed);
    }
    pthread_mutex_unlock(&w->lock);
    return NULL;
}

/* Until the thread has written what it was given. */
static void writer_wait(trace_writer *w) {
    pthread_mutex_lock(&w->lock);
    while (w->job_length != 0) pthread_cond_wait(&w->changed, &w->lock);
    pthread_mutex_unlock(&w->lock);
}

/* The buffer filled so far goes to the thread; the recorder fills the other one. */
static void hand_over(hhr_trace *t) {
    trace_writer *w = t->writer;
    if (t->buffer_used == 0) return;
    writer_wait(w);
    uint8_t *full = t->buffer;
    pthread_mutex_lock(&w->lock);
    t->buffer = w->spare;
    w->spare = full;
    w->job_length = t->buffer_used;
    pthread_cond_broadcast(&w->changed);
    pthread_mutex_unlock(&w->lock);
    t->buffer_used = 0;
}

/* Everything recorded so far is in the file. */
int hhr_trace_flush(hhr_trace *t) {
    if (t->writer == NULL) return t->error;
    hand_over(t);
    writer_wait(t->writer);
    return t->error;
}

/* Room for `length` more bytes at the end of the buffer (a record is never split by a flush). */
static uint8_t *reserve(hhr_trace *t, uint64_t length) {
    if (t->buffer == NULL) return NULL;   /* closed */
    if (t->buffer_used + length > HHR_TRACE_BUFFER_BYTES) hand_over(t);
    if (length > HHR_TRACE_BUFFER_BYTES) return NULL;
    uint8_t *at = t->buffer + t->buffer_used;
    t->buffer_used += length;
    return at;
}

static uint8_t *put(uint8_t *at, const void *value, size_t length) {
    memcpy(at, value, length);
    return at + length;
}

int hhr_trace_open(hhr_trace *t, int fd) {
    t->fd = fd;
    t->buffer = malloc(HHR_TRACE_BUFFER_BYTES);
    t->writes = malloc(HHR_TRACE_SCRATCH_BYTES);
    t->deferred = malloc(HHR_TRACE_DEFERRED_BYTES);
    t->reads = malloc(HHR_TRACE_SCRATCH_BYTES);
    t->code = calloc(HHR_TRACE_CODE_SLOTS, sizeof(hhr_trace_code));
    trace_writer *w = calloc(1, sizeof *w);
    if (w != NULL) w->spare = malloc(HHR_TRACE_BUFFER_BYTES);
    if (!t->buffer || !t->writes || !t->reads || !t->code || !t->deferred || w == NULL || w->spare == NULL) {
        if (w != NULL) free(w->spare);
        free(w);
        hhr_trace_close(t);
        return ENOMEM;
    }
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->changed, NULL);
    t->writer = w;
    int failed = pthread_create(&w->thread, NULL, writer_main, t);
    if (failed) {
        t->writer = NULL;
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->changed);
        free(w->spare);
        free(w);
        hhr_trace_close(t);
        return failed;
    }
    return 0;
}

void hhr_trace_close(hhr_trace *t) {
    trace_writer *w = t->writer;
    if (w != NULL) {
        hhr_trace_flush(t);
        pthread_mutex_lock(&w->lock);
        w->stopping = 1;
        pthread_cond_broadcast(&w->changed);
        pthread_mutex_unlock(&w->lock);
        pthread_join(w->thread, NULL);
        pthread_mutex_destroy(&w->lock);
        pthread_cond_destroy(&w->changed);
        free(w->spare);
        free(w);
        t->writer = NULL;
    }
    free(t->buffer);
    free(t->writes);
    free(t->reads);
    free(t->code);
    free(t->deferred);
    t->buffer = t->writes = t->reads = t->deferred = NULL;
    t->code = NULL;
    t->pending = NULL;
}

static void write_data(hhr_trace *t, const uint8_t *data, uint32_t length);

/* Data records held behind the instruction in progress go to the file after it. */
static void release_deferred(hhr_trace *t) {
    uint64_t used = t->deferred_used;
    t->deferred_used = 0;
    uint8_t *at = used ? reserve(t, used) : NULL;
    if (at != NULL) memcpy(at, t->deferred, used);
}

static void drop_pending(hhr_trace *t) {
    t->pending = NULL;
    release_deferred(t);
}

/* Opaque bytes from Python as one record: an event (`after_instruction`: held behind the
 * instruction in progress), or what names the records around it (the header, a context's name, a
 * phase's), written at once. */
void hhr_trace_data(hhr_trace *t, const uint8_t *data, uint32_t length, int after_instruction) {
    if (t->buffer == NULL) return;
    if (t->pending != NULL && after_instruction) {
        if (t->deferred_used + DATA_HEAD_BYTES + length <= HHR_TRACE_DEFERRED_BYTES) {
            uint8_t kind = HHR_RECORD_DATA, zero[3] = {0, 0, 0};
            uint8_t *at = put(put(t->deferred + t->deferred_used, &kind, 1), zero, 3);
            memcpy(put(at, &length, 4), data, length);
            t->deferred_used += DATA_HEAD_BYTES + length;
            return;
        }
        hhr_trace_finish(t);   /* no room to wait: the instruction goes now, as it is */
    }
    write_data(t, data, length);
}

static void write_data(hhr_trace *t, const uint8_t *data, uint32_t length) {
    uint8_t kind = HHR_RECORD_DATA, zero[3] = {0, 0, 0};
    uint8_t *at = reserve(t, DATA_HEAD_BYTES + (uint64_t)length);
    if (at == NULL) {   /* larger than the buffer: straight to the file after what is buffered */
        uint8_t head[DATA_HEAD_BYTES];
        uint8_t *h = put(put(head, &kind, 1), zero, 3);
        put(h, &length, 4);
        at = reserve(t, DATA_HEAD_BYTES);
        memcpy(at, head, DATA_HEAD_BYTES);
        hhr_trace_flush(t);   /* the thread is idle: the file is the main thread's */
        write_all(t, data, length);
        return;
    }
    at = put(put(at, &kind, 1), zero, 3);
    at = put(at, &length, 4);
    memcpy(at, data, length);
}

/* --- reading the instance --------------------------------------------------------------------- */
static void read_registers(hhr_trace *t, hhr_trace_context *tc, uint64_t *values) {
    void *pointers[HHR_TRACE_REGISTERS];
    for (int i = 0; i < HHR_TRACE_REGISTERS; i++) pointers[i] = &values[i];
    t->reg_read_batch(((hhr_ctx *)tc->ctx)->uc, t->register_ids, pointers, HHR_TRACE_REGISTERS);
}

/* Only the registers in `mask` (the others keep the values `values` holds). */
static void read_some_registers(hhr_trace *t, hhr_trace_context *tc, uint64_t *values, uint32_t mask) {
    void *pointers[HHR_TRACE_REGISTERS];
    int ids[HHR_TRACE_REGISTERS];
    int count = 0;
    for (; mask; mask &= mask - 1) {
        int bit = __builtin_ctz(mask);
        ids[count] = t->register_ids[bit];
        pointers[count++] = &values[bit];
    }
    if (count) t->reg_read_batch(((hhr_ctx *)tc->ctx)->uc, ids, pointers, count);
}

/* The traced registers an instruction may write, by capstone (its registers written, implicit ones
 * included); all of them for an instruction it cannot decode or whose effects come from the machine
 * (I/O, CPUID, MSRs, VMX, privileged and interrupt instructions). RIP always, and RFLAGS unless the
 * instruction is one the SDM says affects no flag (d->flags_kept): capstone 5 leaves the flags out
 * of some instructions' writes (TEST with a memory operand). */
static uint32_t registers_written(const hhr_decoder *d, const uint8_t *code, uint32_t length, uint64_t address) {
    if (d == NULL || length == 0) return ALL_REGISTERS;
    void *instruction = NULL;
    if (d->disasm(d->handle, code, length, address, 1, &instruction) != 1) return ALL_REGISTERS;
    unsigned int id;
    memcpy(&id, instruction, sizeof id);   /* cs_insn begins with its instruction id */
    bool whole = id >= HHR_DECODER_INSTRUCTION_LIMIT || d->read_all[id];
    uint32_t mask = 1U << HHR_TRACE_RIP_INDEX;
    if (whole || !d->flags_kept[id]) mask |= 1U << HHR_TRACE_RFLAGS_INDEX;
    if (!whole && d->block_end_writes[id]) mask |= d->block_end_writes[id] | HHR_WRITES_ACROSS_BLOCKS;
    for (uint32_t g = 0; g < d->group_count && !whole; g++)
        whole = d->in_group(d->handle, instruction, d->groups[g]);
    uint16_t read[64], written[64];
    uint8_t read_count = 0, written_count = 0;
    if (!whole && d->regs_access(d->handle, instruction, read, &read_count, written, &written_count) == 0) {
        for (uint8_t i = 0; i < written_count; i++) {
            if (written[i] >= HHR_DECODER_REGISTER_LIMIT) { whole = true; break; }
            mask |= d->register_bits[written[i]];
        }
    } else {
        whole = true;
    }
    d->free(instruction, 1);
    return whole ? ALL_REGISTERS : mask;
}

/* Bytes at a linear address through the instance's own translation; 0 if any of it does not
 * translate (as ExecutionContext.read_linear gives none). */
static uint32_t read_linear(hhr_ctx *c, uint64_t linear, uint8_t *out, uint32_t length, uint32_t access) {
    uint32_t done = 0;
    while (done < length) {
        uint64_t address = linear + done, physical;
        hhr_fault fault;
        if (!hhr_translate_current(c, address, access, &physical, &fault)) return 0;
        uint64_t chunk = TRACE_PAGE_SIZE - (address & TRACE_PAGE_OFFSET_MASK);
        if (chunk > length - done) chunk = length - done;
        if (physical + chunk > c->ram_size) return 0;
        memcpy(out + done, c->ram + physical, chunk);
        done += (uint32_t)chunk;
    }
    return done;
}

/* The LP an instance runs on: the one whose shared state it is attached to. */
static int lp_of(hhr_trace *t, hhr_trace_context *tc) {
    hhr_ctx *c = tc->ctx;
    if (tc->lp_shared == c->shared && c->shared != NULL) return (int)tc->lp_index;
    for (uint32_t i = 0; i < t->lp_count; i++) {
        hhr_lp *loop = t->lps[i].loop;
        if (loop->shared == c->shared) {
            tc->lp_shared = c->shared;
            tc->lp_index = i;
            return (int)i;
        }
    }
    return -1;
}

/* --- records ----------------------------------------------------------------------------------- */
/* The registers among `candidates` whose values differ (the others are known to be equal). */
static uint32_t changed_mask(const uint64_t *before, const uint64_t *after, uint32_t candidates) {
    uint32_t mask = 0;
    for (; candidates; candidates &= candidates - 1) {
        int i = __builtin_ctz(candidates);
        if (before[i] != after[i]) mask |= 1U << i;
    }
    return mask;
}

static uint8_t *put_values(uint8_t *at, uint32_t mask, const uint64_t *values) {
    for (; mask; mask &= mask - 1) at = put(at, &values[__builtin_ctz(mask)], WORD_BYTES);
    return at;
}

/* Registers of an instance that changed while it did not run (a VM entry's or exit's loads, the
 * hypervisor writing a guest's state): written before its next instruction, at that time. The
 * first record of an instance holds all its registers (HHR_LOAD_INITIAL). */
static void write_load(hhr_trace *t, hhr_trace_context *tc, uint32_t lp, uint64_t time, const uint64_t *now) {
    uint8_t flags = tc->seen ? 0 : HHR_LOAD_INITIAL;
    uint32_t mask = tc->seen ? changed_mask(tc->registers, now, ALL_REGISTERS) : ALL_REGISTERS;
    uint8_t *at = reserve(t, LOAD_HEAD_BYTES + WORD_BYTES * (uint64_t)__builtin_popcount(mask));
    if (at == NULL) return;
    uint8_t kind = HHR_RECORD_LOAD, lp8 = (uint8_t)lp, phase = (uint8_t)t->lps[lp].phase;
    uint16_t id = (uint16_t)tc->id, zero16 = 0;
    at = put(put(put(put(at, &kind, 1), &lp8, 1), &phase, 1), &flags, 1);
    at = put(put(put(at, &id, 2), &zero16, 2), &mask, 4);
    at = put(at, &time, WORD_BYTES);
    put_values(at, mask, now);
    memcpy(tc->registers, now, sizeof tc->registers);
    tc->seen = 1;
}

/* A guest instance's instructions belong to another VMCS from here on (instances are pooled). */
static void write_bind(hhr_trace *t, hhr_trace_context *tc, uint64_t vmcs) {
    uint8_t *at = reserve(t, BIND_BYTES);
    if (at == NULL) return;
    uint8_t kind = HHR_RECORD_BIND, zero = 0;
    uint16_t id = (uint16_t)tc->id;
    uint32_t zero32 = 0;
    at = put(put(put(put(at, &kind, 1), &zero, 1), &id, 2), &zero32, 4);
    put(at, &vmcs, WORD_BYTES);
    tc->vmcs = vmcs;
}

/* The instruction's bytes: a record only when they differ from what the file last said for this
 * (context, address), so a loop's bytes are written once. */
static uint32_t write_code(hhr_trace *t, hhr_trace_context *tc, uint64_t address, uint64_t cr3) {
    hhr_ctx *c = tc->ctx;
    uint64_t page = address & ~TRACE_PAGE_OFFSET_MASK;
    uint64_t words[HHR_TRACE_CODE_WORDS];
    uint8_t *bytes = (uint8_t *)words;
    uint32_t length = 0;
    if (!tc->code_valid || tc->code_page != page || tc->code_cr3 != cr3 || tc->code_eptp != c->eptp) {
        uint64_t physical;
        hhr_fault fault;
        tc->code_valid = 0;
        if (hhr_translate_current(c, page, HHR_ACCESS_FETCH, &physical, &fault) &&
            physical + TRACE_PAGE_SIZE <= c->ram_size) {
            tc->code_valid = 1;
            tc->code_page = page;
            tc->code_cr3 = cr3;
            tc->code_eptp = c->eptp;
            tc->code_host = physical;
        }
    }
    if (tc->code_valid) {
        uint64_t offset = address & TRACE_PAGE_OFFSET_MASK;
        uint64_t in_page = TRACE_PAGE_SIZE - offset;
        length = in_page < HHR_TRACE_CODE_BYTES ? (uint32_t)in_page : HHR_TRACE_CODE_BYTES;
        memcpy(bytes, c->ram + tc->code_host + offset, length);
        if (length < HHR_TRACE_CODE_BYTES)   /* the instruction may go on in the next page */
            length += read_linear(c, address + length, bytes + length, HHR_TRACE_CODE_BYTES - length,
                                  HHR_ACCESS_FETCH);
    }
    memset(bytes + length, 0, sizeof words - length);
    uint64_t hash = ((address ^ ((uint64_t)tc->id << 48)) * HASH_MULTIPLIER) >> HASH_SHIFT;
    hhr_trace_code *slot = &t->code[hash & (HHR_TRACE_CODE_SLOTS - 1)];
    if (slot->used && slot->address == address && slot->context == tc->id && slot->length == length &&
        slot->words[0] == words[0] && slot->words[1] == words[1])
        return slot->writes;
    slot->used = 1;
    slot->address = address;
    slot->context = tc->id;
    slot->length = length;
    memcpy(slot->words, words, sizeof words);
    slot->writes = registers_written(t->decoder, bytes, length, address);
    uint8_t *at = reserve(t, CODE_HEAD_BYTES + (uint64_t)length);
    if (at == NULL) return slot->writes;
    uint8_t kind = HHR_RECORD_CODE, length8 = (uint8_t)length;
    uint16_t id = (uint16_t)tc->id;
    uint32_t zero = 0;
    at = put(put(put(put(at, &kind, 1), &length8, 1), &id, 2), &zero, 4);
    at = put(at, &address, WORD_BYTES);
    memcpy(at, bytes, length);
    return slot->writes;
}

/* The pending instruction, complete with the registers after it, to the file. Its instance's
 * registers[] hold those before it (they were the registers when it began); `after` holds those in
 * `candidates`, the others being those it cannot have changed. */
static void write_instruction(hhr_trace *t, const uint64_t *after, uint32_t candidates) {
    hhr_trace_context *tc = t->pending;
    uint32_t lp = t->pending_lp;
    hhr_trace_lp *l = &t->lps[lp];
    t->pending = NULL;
    uint64_t time = t->pending_time, rip = t->pending_rip;
    uint32_t changed = changed_mask(tc->registers, after, candidates), mask = changed;
    uint8_t flags = 0;
    if ((mask & (1U << HHR_TRACE_RIP_INDEX)) && after[HHR_TRACE_RIP_INDEX] == rip + t->pending_size) {
        mask &= ~(1U << HHR_TRACE_RIP_INDEX);
        flags |= HHR_INSN_RIP_ADVANCED;
    }
    if (l->written && time == l->last_time + 1) flags |= HHR_INSN_TIME_NEXT;
    if (l->written && rip == l->next_rip) flags |= HHR_INSN_RIP_NEXT;
    hhr_ctx *c = tc->ctx;
    for (uint32_t i = 0; i < t->wide_count; i++) {   /* writes Unicorn gave no value for: read back */
        uint8_t *entry = t->writes + t->wide_offsets[i];
        uint64_t address;
        uint32_t length;
        memcpy(&address, entry, WORD_BYTES);
        memcpy(&length, entry + WORD_BYTES, 4);
        if (!read_linear(c, address, entry + MEMORY_ENTRY_HEAD_BYTES, length, HHR_ACCESS_READ))
            memset(entry + MEMORY_ENTRY_HEAD_BYTES, 0, length);
    }
    if (t->write_count) flags |= HHR_INSN_WRITES;
    if (t->read_count) flags |= HHR_INSN_READS;
    uint64_t length = INSTRUCTION_HEAD_BYTES + WORD_BYTES * (uint64_t)__builtin_popcount(mask);
    if (!(flags & HHR_INSN_TIME_NEXT)) length += WORD_BYTES;
    if (!(flags & HHR_INSN_RIP_NEXT)) length += WORD_BYTES;
    if (t->write_count) length += MEMORY_LIST_HEAD_BYTES + t->writes_used;
    if (t->read_count) length += MEMORY_LIST_HEAD_BYTES + t->reads_used;
    uint8_t *at = reserve(t, length);
    if (at != NULL) {
        uint8_t kind = HHR_RECORD_INSTRUCTION, lp8 = (uint8_t)lp, phase = (uint8_t)l->phase;
        uint8_t size8 = (uint8_t)t->pending_size, zero = 0;
        uint16_t id = (uint16_t)tc->id;
        at = put(put(put(put(at, &kind, 1), &lp8, 1), &phase, 1), &flags, 1);
        at = put(put(put(put(at, &id, 2), &size8, 1), &zero, 1), &mask, 4);
        if (!(flags & HHR_INSN_TIME_NEXT)) at = put(at, &time, WORD_BYTES);
        if (!(flags & HHR_INSN_RIP_NEXT)) at = put(at, &rip, WORD_BYTES);
        at = put_values(at, mask, after);
        if (t->write_count) {
            uint32_t bytes = (uint32_t)t->writes_used;
            at = put(put(put(at, &t->write_count, 4), &bytes, 4), t->writes, t->writes_used);
        }
        if (t->read_count) {
            uint32_t bytes = (uint32_t)t->reads_used;
            put(put(put(at, &t->read_count, 4), &bytes, 4), t->reads, t->reads_used);
        }
    }
    l->written = 1;
    l->last_time = time;
    l->next_rip = rip + t->pending_size;
    for (; changed; changed &= changed - 1) {
        int i = __builtin_ctz(changed);
        tc->registers[i] = after[i];
    }
    tc->seen = 1;
    t->recorded++;
    release_deferred(t);
    if (l->end_after_this) {
        l->end_after_this = 0;
        hhr_on_trace_lp_done(t->python_id, lp);
    }
}

void hhr_trace_finish(hhr_trace *t) {
    if (t->pending == NULL) return;
    if (!t->recording) {   /* the window closed first: the instruction is not the trace's */
        drop_pending(t);
        return;
    }
    uint64_t after[HHR_TRACE_REGISTERS];
    read_registers(t, t->pending, after);
    write_instruction(t, after, ALL_REGISTERS);
}

/* The flags Python gave the VMCS a guest instance runs, asking it the first time. */
static uint32_t vmcs_flags(hhr_trace *t, uint32_t lp, uint64_t vmcs) {
    uint64_t hash = (vmcs * HASH_MULTIPLIER) >> HASH_SHIFT;
    for (uint32_t probe = 0; probe < HHR_TRACE_NAME_SLOTS; probe++) {
        hhr_trace_name *slot = &t->names[(hash + probe) & (HHR_TRACE_NAME_SLOTS - 1)];
        if (slot->used && slot->vmcs == vmcs) return slot->flags;
        if (!slot->used) {
            slot->used = 1;
            slot->vmcs = vmcs;
            slot->flags = (uint32_t)hhr_on_trace_vmcs(t->python_id, lp, vmcs);
            return slot->flags;
        }
    }
    return (uint32_t)hhr_on_trace_vmcs(t->python_id, lp, vmcs);   /* a full table: ask every time */
}

void hhr_trace_forget_names(hhr_trace *t) {
    memset(t->names, 0, sizeof t->names);
}

/* An instruction begins on LP `lp` at `time`: the pending one is complete, and this one is pending
 * if the window takes it. `by_machine`: the machine carries it out itself, between runs;
 * `block_start`: it is the first of a block. */
static void begin(hhr_trace *t, hhr_trace_context *tc, uint32_t lp, uint64_t address, uint32_t size,
                  uint64_t time, bool by_machine, bool block_start) {
    uint64_t now[HHR_TRACE_REGISTERS];   /* registers read (the candidates only, in part) */
    bool registers_current = false;      /* tc->registers are its registers now */
    if (t->buffer == NULL) return;   /* closed */
    if (t->pending != NULL) {
        if (t->pending == tc) {
            /* Within one run of an instance only its instructions change its registers: after an
             * instruction, only what it may write changed, and RIP is where the next instruction
             * is. Between runs the machine may have written any (a VM entry or exit, an exception
             * or interrupt delivered, a trapped instruction carried out: each ends the run), so
             * all are read at a run's first instruction. The hooks that write registers in the
             * middle of a run (I/O, CPUID, MSRs) are for instructions read whole. A block ends
             * after a branch, or for a reason capstone's lists were never held to (an instruction
             * that ends its block, a page's end): all are read at a block's start unless the
             * block before ended with an instruction whose writes the SDM gives (a branch, a REP
             * string iteration: decoder.py). */
            uint32_t candidates = ALL_REGISTERS;
            uint32_t writes = t->pending_writes;
            if (by_machine || t->pending_run != ((hhr_ctx *)tc->ctx)->runs || t->read_all_registers ||
                writes == ALL_REGISTERS || (block_start && !(writes & HHR_WRITES_ACROSS_BLOCKS))) {
                read_registers(t, tc, now);
            } else {   /* now[] holds only the candidates */
                candidates = writes & ALL_REGISTERS;
                now[HHR_TRACE_RIP_INDEX] = address;
                read_some_registers(t, tc, now, candidates & ~(1U << HHR_TRACE_RIP_INDEX));
            }
            if (t->recording) {
                write_instruction(t, now, candidates);
                registers_current = true;   /* tc->registers are the registers now */
            } else {
                drop_pending(t);
            }
        } else {
            hhr_trace_finish(t);
        }
    }
    hhr_trace_lp *l = &t->lps[lp];
    if (!t->recording || l->done) return;
    if (t->has_time_window && (time < t->window_start || time >= t->window_end)) return;
    if (!registers_current) read_registers(t, tc, now);   /* whole, for the loaded-registers check */
    hhr_ctx *c = tc->ctx;
    hhr_lp *loop = l->loop;
    uint64_t vmcs = 0;
    if (c != loop->root) {   /* a guest instance runs the LP's current VMCS (SDM Vol. 3C 26.1) */
        hhr_vmcs *current = loop->vmx->current;
        if (current != NULL && current->guest_ctx == c) vmcs = current->address;
    }
    if (vmcs != tc->vmcs) write_bind(t, tc, vmcs);
    if (vmcs != 0) {   /* named (a data record) before any record of it */
        uint32_t flags = vmcs_flags(t, lp, vmcs);
        if (t->per_lp_end && (flags & HHR_VMCS_ENDS_WINDOW)) {
            l->done = 1;
            l->end_after_this = 1;
        }
    }
    if (!registers_current && (!tc->seen || memcmp(tc->registers, now, sizeof now) != 0))
        write_load(t, tc, lp, time, now);   /* tc->registers are `now` from here on */
    t->pending_writes = write_code(t, tc, address, tc->registers[HHR_TRACE_CR3_INDEX]);
    t->pending = tc;
    t->pending_lp = lp;
    t->pending_time = time;
    t->pending_rip = address;
    t->pending_size = size;
    t->pending_run = c->runs;
    t->writes_used = t->write_count = t->wide_count = 0;
    t->reads_used = t->read_count = 0;
}

/* --- hooks ------------------------------------------------------------------------------------- */
/* UC_HOOK_CODE: an instruction is about to run. Its time: the block hook has counted the whole block
 * already (fastpath.c), so the block's first instruction began at the LP's clock less the block's
 * count, and each next one a tick later. */
void hhr_trace_code_hook(void *uc, uint64_t address, uint32_t size, void *user_data) {
    hhr_trace_context *tc = user_data;
    hhr_trace *t = tc->trace;
    hhr_ctx *c = tc->ctx;
    (void)uc;
    int lp = lp_of(t, tc);
    if (lp < 0) return;
    uint64_t base, index;
    if (tc->blocks_mark == c->blocks) {
        if (t->pending == tc && t->pending_rip == address) return;   /* a REP string instruction's next iteration */
        base = tc->block_base;
        index = tc->block_index + 1;
    } else {
        hhr_lp *loop = t->lps[lp].loop;
        base = loop->run_time_base - loop->run_mark + c->retired - c->block_icount;
        index = 0;
    }
    bool block_start = tc->blocks_mark != c->blocks;
    tc->blocks_mark = c->blocks;
    tc->block_base = base;
    tc->block_index = index;
    begin(t, tc, (uint32_t)lp, address, size, base + index, false, block_start);
}

/* An instruction the machine carries out itself instead of Unicorn (Python tells its clock). */
void hhr_trace_trapped(hhr_trace_context *tc, uint32_t lp, uint64_t time, uint64_t address, uint32_t size) {
    begin(tc->trace, tc, lp, address, size, time, true, true);
}

/* The same, from the machine's C transition loop (emu/fastpath.c), which knows the instance. */
void hhr_trace_trapped_in_loop(hhr_ctx *c, uint64_t time, uint64_t address, uint32_t size) {
    hhr_trace_context *tc = c->trace;
    int lp = lp_of(tc->trace, tc);
    if (lp >= 0) begin(tc->trace, tc, (uint32_t)lp, address, size, time, true, true);
}

static void add_entry(uint8_t *scratch, uint64_t *used, uint32_t *count, uint32_t *lost, uint64_t address,
                      uint32_t length, const void *bytes, uint64_t *offset) {
    if (*used + MEMORY_ENTRY_HEAD_BYTES + length > HHR_TRACE_SCRATCH_BYTES) {
        (*lost)++;
        return;
    }
    uint8_t *at = scratch + *used;
    if (offset != NULL) *offset = *used;
    at = put(put(at, &address, WORD_BYTES), &length, 4);
    if (bytes != NULL) memcpy(at, bytes, length);
    *used += MEMORY_ENTRY_HEAD_BYTES + length;
    (*count)++;
}

/* UC_HOOK_MEM_WRITE: before the store, with its value when it is at most a word wide. */
void hhr_trace_write_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data) {
    hhr_trace_context *tc = user_data;
    hhr_trace *t = tc->trace;
    (void)uc;
    (void)type;
    if (t->pending != tc || size <= 0) return;
    if (size <= WORD_BYTES) {
        add_entry(t->writes, &t->writes_used, &t->write_count, &t->writes_lost, address, (uint32_t)size,
                  &value, NULL);
    } else if (t->wide_count < HHR_TRACE_WIDE_WRITES) {
        add_entry(t->writes, &t->writes_used, &t->write_count, &t->writes_lost, address, (uint32_t)size,
                  NULL, &t->wide_offsets[t->wide_count]);
        t->wide_count++;
    } else {
        t->writes_lost++;
    }
}

/* UC_HOOK_MEM_READ: before the load, with no value: the bytes are read through the instance's own
 * translation, as the load will. */
void hhr_trace_read_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data) {
    hhr_trace_context *tc = user_data;
    hhr_trace *t = tc->trace;
    uint8_t bytes[READ_BYTES_MAX];
    (void)uc;
    (void)type;
    (void)value;
    if (t->pending != tc || size <= 0 || !t->record_reads) return;
    uint32_t length = (uint32_t)size <= sizeof bytes ? (uint32_t)size : (uint32_t)sizeof bytes;
    uint32_t got = read_linear(tc->ctx, address, bytes, length, HHR_ACCESS_READ);
    add_entry(t->reads, &t->reads_used, &t->read_count, &t->reads_lost, address, got, bytes, NULL);
}
