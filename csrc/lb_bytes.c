/* Byte-level kernels of the wire format: LEB128 gap coding of sorted positions
 * (strictly validated on decode: untrusted bytes never read or write out of bounds),
 * and bit packing of index/code widths. */
#include "lb_common.h"

/* LEB128 gaps of strictly increasing non-negative positions into out (room for
 * 10 bytes a position). Returns the byte count, or -1 if not strictly increasing. */
int64_t lb_encode_gaps(const int64_t *idx, int64_t count, uint8_t *out) {
    int64_t o = 0, prev = -1;
    for (int64_t j = 0; j < count; j++) {
        if (idx[j] <= prev) return -1;
        uint64_t g = (uint64_t)(idx[j] - prev - 1);
        prev = idx[j];
        while (g >= 0x80) {
            out[o++] = (uint8_t)(g | 0x80);
            g >>= 7;
        }
        out[o++] = (uint8_t)g;
    }
    return o;
}

/* Exactly count positions from len bytes, each below limit. LB_BADSTREAM for a
 * truncated or overlong (over 9 bytes) varint or trailing bytes, LB_OUTOFRANGE for
 * a gap or position at or above limit. */
int lb_decode_gaps(const uint8_t *buf, int64_t len, int64_t count, int64_t limit, int64_t *out) {
    int64_t p = 0;
    uint64_t prev = (uint64_t)-1; /* position -1 */
    for (int64_t j = 0; j < count; j++) {
        uint64_t g = 0;
        int b = 0;
        for (;;) {
            if (p >= len) return LB_BADSTREAM;
            if (b == 9) return LB_BADSTREAM;
            uint8_t byte = buf[p++];
            g |= (uint64_t)(byte & 0x7F) << (7 * b);
            b++;
            if (byte < 0x80) break;
        }
        if (limit <= 0 || g >= (uint64_t)limit) return LB_OUTOFRANGE;
        uint64_t pos = prev + 1 + g; /* < 2**64: both terms are below 2**63 */
        if (pos >= (uint64_t)limit) return LB_OUTOFRANGE;
        out[j] = (int64_t)pos;
        prev = pos;
    }
    return p == len ? LB_OK : LB_BADSTREAM;
}

/* Pack n codes of 1, 2, 4, 12 or 16 bits (each must fit its width). */
int lb_pack_bits(const int32_t *u, int64_t n, int bits, uint8_t *out) {
    if (bits == 12) {
        int64_t pairs = n / 2;
        for (int64_t j = 0; j < pairs; j++) {
            uint32_t v = ((uint32_t)u[2 * j] & 0xFFFu) | (((uint32_t)u[2 * j + 1] & 0xFFFu) << 12);
            out[3 * j] = (uint8_t)v;
            out[3 * j + 1] = (uint8_t)(v >> 8);
            out[3 * j + 2] = (uint8_t)(v >> 16);
        }
        if (n % 2) {
            uint32_t v = (uint32_t)u[n - 1] & 0xFFFu;
            out[3 * pairs] = (uint8_t)v;
            out[3 * pairs + 1] = (uint8_t)(v >> 8);
            out[3 * pairs + 2] = 0;
        }
        return LB_OK;
    }
    if (bits == 16) {
        for (int64_t j = 0; j < n; j++) {
            out[2 * j] = (uint8_t)u[j];
            out[2 * j + 1] = (uint8_t)((uint32_t)u[j] >> 8);
        }
        return LB_OK;
    }
    if (bits != 1 && bits != 2 && bits != 4) return LB_BADARG;
    const int per = 8 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    int64_t nbytes = (n + per - 1) / per;
    for (int64_t o = 0; o < nbytes; o++) {
        uint32_t acc = 0;
        int64_t base = o * per;
        for (int s = 0; s < per && base + s < n; s++) acc |= ((uint32_t)u[base + s] & mask) << (s * bits);
        out[o] = (uint8_t)acc;
    }
    return LB_OK;
}

/* Inverse of lb_pack_bits: n codes as int32. */
int lb_unpack_bits(const uint8_t *d, int64_t n, int bits, int32_t *out) {
    if (bits == 12) {
        for (int64_t j = 0; j < n; j++) {
            const uint8_t *q = d + 3 * (j / 2);
            uint32_t v = (uint32_t)q[0] | ((uint32_t)q[1] << 8) | ((uint32_t)q[2] << 16);
            out[j] = (int32_t)((j % 2 ? v >> 12 : v) & 0xFFFu);
        }
        return LB_OK;
    }
    if (bits == 16) {
        for (int64_t j = 0; j < n; j++) out[j] = (int32_t)((uint32_t)d[2 * j] | ((uint32_t)d[2 * j + 1] << 8));
        return LB_OK;
    }
    if (bits != 1 && bits != 2 && bits != 4) return LB_BADARG;
    const uint32_t mask = (1u << bits) - 1u;
    for (int64_t j = 0; j < n; j++) out[j] = (int32_t)((d[(j * bits) >> 3] >> ((j * bits) & 7)) & mask);
    return LB_OK;
}
