/*
 * The text and JSON Lines renderers' inner loop, in C (the reading side of tracepath.c's file,
 * driven by tools/trace/lines.py): walks instruction records and writes one line per instruction
 * into a buffer, as tools/trace/text.py and jsonl.py would. Everything else is Python's: a record
 * of another kind, or an instruction at an address whose site (context name, symbol, bytes and
 * disassembly, padded) Python has not described yet, hands the loop back with a status.
 */
#include "tracepath.h"

#define RENDER_TIME_WIDTH 12          /* tools/trace/text.py TIME_WIDTH */
#define LINE_OVERHEAD 512             /* prefix, punctuation and the registers' names, at most */
#define REGISTER_TEXT_BYTES 24        /* "=0x" and 16 digits and a separator, per register */
#define MEMORY_ENTRY_TEXT_BYTES 32    /* " [0x...]<-" or ["0x...",""], per entry */
#define MEMORY_BYTE_TEXT_BYTES 3      /* "xx " per byte */
#define COUNT_HASH_MULTIPLIER 0x9E3779B97F4A7C15ULL

static const char HEX_DIGITS[] = "0123456789abcdef";

static char *put_text(char *at, const char *text, size_t length) {
    memcpy(at, text, length);
    return at + length;
}

/* Right-aligned in `width` columns, as Python's f"{value:>{width}}" (0: as wide as it is). */
static char *put_decimal_width(char *at, uint64_t value, int width) {
    char digits[24];
    int count = 0;
    do {
        digits[count++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    for (int pad = width - count; pad > 0; pad--) *at++ = ' ';
    while (count) *at++ = digits[--count];
    return at;
}

static char *put_decimal(char *at, uint64_t value) {
    return put_decimal_width(at, value, 0);
}

/* As Python's f"{value:#x}". */
static char *put_hex(char *at, uint64_t value) {
    char digits[16];
    int count = 0;
    do {
        digits[count++] = HEX_DIGITS[value & 0xF];
        value >>= 4;
    } while (value);
    *at++ = '0';
    *at++ = 'x';
    while (count) *at++ = digits[--count];
    return at;
}

static char *put_bytes_hex(char *at, const uint8_t *bytes, uint32_t length, bool spaced, bool continues) {
    for (uint32_t i = 0; i < length; i++) {
        if (spaced && (i || continues)) *at++ = ' ';
        *at++ = HEX_DIGITS[bytes[i] >> 4];
        *at++ = HEX_DIGITS[bytes[i] & 0xF];
    }
    return at;
}

static hhr_render_site *site_slot(hhr_render *r, uint32_t context, uint64_t address) {
    uint64_t hash = ((address ^ ((uint64_t)context << 48)) * COUNT_HASH_MULTIPLIER) >> 32;
    for (uint32_t probe = 0; probe <= r->site_mask; probe++) {
        hhr_render_site *slot = &r->sites[(hash + probe) & r->site_mask];
        if (!slot->used || (slot->address == address && slot->context == context)) return slot;
    }
    return NULL;
}

int hhr_render_add_site(hhr_render *r, const hhr_render_site *site) {
    if (2 * (uint64_t)(r->site_count + 1) > (uint64_t)r->site_mask + 1) return 0;   /* Python clears and retries */
    hhr_render_site *slot = site_slot(r, site->context, site->address);
    if (slot == NULL) return 0;
    if (!slot->used) r->site_count++;
    *slot = *site;
    slot->used = 1;
    return 1;
}

void hhr_render_forget_sites(hhr_render *r) {
    memset(r->sites, 0, sizeof(hhr_render_site) * ((size_t)r->site_mask + 1));
    r->site_count = 0;
}

/* Removes one site, keeping the probe chains of the others whole (re-inserting what follows it). */
void hhr_render_forget_site(hhr_render *r, uint32_t context, uint64_t address) {
    hhr_render_site *slot = site_slot(r, context, address);
    if (slot == NULL || !slot->used) return;
    slot->used = 0;
    r->site_count--;
    uint32_t index = (uint32_t)(slot - r->sites);
    for (uint32_t next = (index + 1) & r->site_mask; r->sites[next].used; next = (next + 1) & r->site_mask) {
        hhr_render_site moved = r->sites[next];
        r->sites[next].used = 0;
        r->site_count--;
        hhr_render_add_site(r, &moved);
    }
}

static int count(hhr_render *r, uint64_t key) {
    uint64_t stored = key + 1;
    uint64_t hash = (key * COUNT_HASH_MULTIPLIER) >> 32;
    for (uint32_t probe = 0; probe <= r->count_mask; probe++) {
        uint32_t index = (uint32_t)((hash + probe) & r->count_mask);
        if (r->count_keys[index] == stored) {
            r->count_values[index]++;
            return 1;
        }
        if (r->count_keys[index] == 0) {
            if (2 * (uint64_t)(r->count_used + 1) > (uint64_t)r->count_mask + 1) return 0;
            r->count_keys[index] = stored;
            r->count_values[index] = 1;
            r->count_used++;
            return 1;
        }
    }
    return 0;
}

/* A memory list of an instruction record: its size in the file, entries and bytes. */
static bool memory_list(const hhr_render *r, uint64_t at, uint32_t *entries, uint32_t *bytes) {
    if (at + 8 > r->size) return false;
    memcpy(entries, r->file + at, 4);
    memcpy(bytes, r->file + at + 4, 4);
    return at + 8 + *bytes <= r->size;
}

int hhr_render_lines(hhr_render *r) {
    const uint8_t *file = r->file;
    while (r->offset < r->size) {
        uint64_t at = r->offset;
        if (file[at] != HHR_RECORD_INSTRUCTION) return HHR_RENDER_RECORD;
        if (at + 12 > r->size) return HHR_RENDER_DAMAGED;
        uint8_t lp = file[at + 1], phase = file[at + 2], flags = file[at + 3], size = file[at + 6];
        uint16_t context;
        uint32_t mask;
        memcpy(&context, file + at + 4, 2);
        memcpy(&mask, file + at + 8, 4);
        at += 12;
        uint64_t time, address;
        if (flags & HHR_INSN_TIME_NEXT) {
            time = r->lp_time[lp] + 1;
        } else {
            if (at + 8 > r->size) return HHR_RENDER_DAMAGED;
            memcpy(&time, file + at, 8);
            at += 8;
        }
        if (flags & HHR_INSN_RIP_NEXT) {
            address = r->lp_next_rip[lp];
        } else {
            if (at + 8 > r->size) return HHR_RENDER_DAMAGED;
            memcpy(&address, file + at, 8);
            at += 8;
        }
        uint32_t registers = (uint32_t)__builtin_popcount(mask);
        uint64_t values_at = at;
        at += 8 * (uint64_t)registers;
        uint32_t write_entries = 0, write_bytes = 0, read_entries = 0, read_bytes = 0;
        uint64_t writes_at = 0;
        if (flags & HHR_INSN_WRITES) {
            if (!memory_list(r, at, &write_entries, &write_bytes)) return HHR_RENDER_DAMAGED;
            writes_at = at + 8;
            at += 8 + (uint64_t)write_bytes;
        }
        if (flags & HHR_INSN_READS) {
            if (!memory_list(r, at, &read_entries, &read_bytes)) return HHR_RENDER_DAMAGED;
            at += 8 + (uint64_t)read_bytes;
        }
        if (at > r->size) return HHR_RENDER_DAMAGED;
        hhr_render_site *site = NULL;
        if (r->wants_instructions) {
            site = site_slot(r, context, address);
            if (site == NULL || !site->used) {   /* Python describes it; the record is read again */
                r->miss_context = context;
                r->miss_lp = lp;
                r->miss_size = size;
                r->miss_address = address;
                return HHR_RENDER_SITE;
            }
        }
        bool shown = site != NULL && site->taken && r->lp_taken[lp] && r->phase_taken[phase] &&
                     (!r->has_range || (time >= r->range_start && time < r->range_end));
        if (shown) {
            uint64_t bound = LINE_OVERHEAD + site->fixed_length + site->context_json_length +
                             r->phase_json_length[phase] + REGISTER_TEXT_BYTES * (uint64_t)(registers + 1) +
                             MEMORY_ENTRY_TEXT_BYTES * (uint64_t)write_entries +
                             MEMORY_BYTE_TEXT_BYTES * (uint64_t)write_bytes;
            if (r->out_used + bound > r->out_capacity) {
                r->needed = bound;
                return HHR_RENDER_OUTPUT_FULL;
            }
            if (!count(r, ((uint64_t)site->number << 16) | ((uint64_t)phase << 8) | lp))
                return HHR_RENDER_COUNTS_FULL;
            char *out = r->out + r->out_used;
            bool json = r->json;
            if (json) {
                out = put_text(out, "{\"type\":\"insn\",\"t\":", 19);
                out = put_decimal(out, time);
                out = put_text(out, ",\"lp\":", 6);
                out = put_decimal(out, lp);
                out = put_text(out, ",\"ctx\":", 7);
                out = put_text(out, site->context_json, site->context_json_length);
                out = put_text(out, ",\"phase\":", 9);
                out = put_text(out, r->phase_json[phase], r->phase_json_length[phase]);
                *out++ = ',';
                out = put_text(out, site->fixed, site->fixed_length);
                out = put_text(out, "\"regs\":{", 8);
            } else {
                out = put_decimal_width(out, time, RENDER_TIME_WIDTH);
                out = put_text(out, " lp", 3);
                out = put_decimal(out, lp);
                *out++ = ' ';
            }
            char *effects = out;
            if (!json) out = put_text(out, site->fixed, site->fixed_length);
            char *after_fixed = out;
            /* The registers changed, in their order; RIP only when it is not the next instruction's
             * address (the recorder left out RIP that advanced by Unicorn's size, which is wrong for
             * an instruction Unicorn cannot decode). */
            bool first = true;
            uint64_t value_at = values_at;
            for (int bit = 0; bit < HHR_TRACE_REGISTERS; bit++) {
                uint64_t value;
                if (mask & (1U << bit)) {
                    memcpy(&value, file + value_at, 8);
                    value_at += 8;
                    if (bit == HHR_TRACE_RIP_INDEX && value == address + site->exact_length) continue;
                } else if (bit == HHR_TRACE_RIP_INDEX && (flags & HHR_INSN_RIP_ADVANCED) &&
                           site->exact_length != size) {
                    value = address + size;
                } else {
                    continue;
                }
                const char *name = r->register_names[bit];
                if (json) {
                    if (!first) *out++ = ',';
                    *out++ = '"';
                    out = put_text(out, name, strlen(name));
                    out = put_text(out, "\":\"", 3);
                    out = put_hex(out, value);
                    *out++ = '"';
                } else {
                    *out++ = ' ';
                    out = put_text(out, name, strlen(name));
                    *out++ = '=';
                    out = put_hex(out, value);
                }
                first = false;
            }
            if (json) out = put_text(out, "},\"mem\":[", 9);
            /* Memory written, writes that continue one another joined (tools/trace/annotate.py coalesce). */
            uint64_t entry = writes_at, run_end = 0, run_bytes = 0;
            bool in_run = false;
            for (uint32_t i = 0; i < write_entries; i++) {
                uint64_t write_address;
                uint32_t length;
                memcpy(&write_address, file + entry, 8);
                memcpy(&length, file + entry + 8, 4);
                const uint8_t *bytes = file + entry + 12;
                entry += 12 + (uint64_t)length;
                bool continues = in_run && write_address == run_end;
                if (!continues) {
                    run_bytes = 0;
                    if (json) {
                        if (in_run) out = put_text(out, "\"],", 3);
                        out = put_text(out, "[\"", 2);
                        out = put_hex(out, write_address);
                        out = put_text(out, "\",\"", 3);
                    } else {
                        out = put_text(out, " [", 2);
                        out = put_hex(out, write_address);
                        out = put_text(out, "]<-", 3);
                    }
                }
                out = put_bytes_hex(out, bytes, length, !json, run_bytes > 0);
                in_run = true;
                run_end = write_address + length;
                run_bytes += length;
            }
            if (json) {
                if (in_run) out = put_text(out, "\"]", 2);
                out = put_text(out, "]}\n", 3);
            } else if (out == after_fixed) {   /* no effects: the line ends at its last column */
                out = effects + site->fixed_trimmed_length;
                *out++ = '\n';
            } else {
                *out++ = '\n';
            }
            r->out_used = (uint64_t)(out - r->out);
            if (!r->have_time || time < r->first_time) r->first_time = time;
            if (!r->have_time || time > r->last_time) r->last_time = time;
            r->have_time = 1;
        }
        r->lp_time[lp] = time;
        r->lp_next_rip[lp] = address + size;
        r->instructions++;
        r->offset = at;
    }
    return HHR_RENDER_END;
}
