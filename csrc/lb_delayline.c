/* The packet loop of the netns link emulator's delay line (lowband/wan/_delayline.py).
 *
 * The core namespace routes what host i sends to another host into the TUN device t<i>. This
 * loop reads those packets, holds each for its (source, destination) pair's one-way delay plus a
 * uniform jitter in [-j, +j], and writes it back into the device it came from; the kernel routes
 * it on to the destination. This loop runs the whole read -> hold -> write cycle without the GIL
 * (ctypes releases it around lb_dl_run), so the Python side only answers commands; its own work
 * is 1-2 us a packet, against about 10 us more for the Python loop. What remains is the kernel:
 * write() runs the packet's onward path inline (routing, tbf, the receiving host's TCP), which
 * write_s in the statistics counts (docs/wan.md, "Where the delay line stops keeping up").
 *
 * Schedule, the same rule as lowband/wan/_schedule.py's PairClock: release = max(now + max(0,
 * delay + jitter), stall end of either host, the pair's previous release). Release times are
 * monotonic per pair, so each pair is a FIFO queue and a binary heap over the pairs' heads finds
 * the next packet due. Packets that are not between two hosts (e.g. to the hub) are written back
 * at once, in arrival order. Time is CLOCK_MONOTONIC (Python's time.monotonic()).
 *
 * Shared state: the command thread (Python) sets cuts and stalls with lb_dl_cut / lb_dl_stall
 * (relaxed atomics, read per packet), asks for statistics with lb_dl_stats (a snapshot the loop
 * publishes under a mutex before each wait) and ends the loop with lb_dl_stop (an eventfd the
 * loop polls). Memory is bounded: beyond cap_bytes held, packets are dropped and counted.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define LB_DL_ABI 1
#define LB_DL_BATCH 64            /* reads per device per wake */
#define LB_DL_SCRATCH (1 << 18)   /* one read: a 64 KiB GSO super-packet and its headers fit */
#define LB_DL_MAX_HOSTS 1024

typedef struct lb_dl_packet {
    struct lb_dl_packet *next;
    int64_t release_ns;
    int fd;
    uint32_t len;
    unsigned char data[];
} lb_dl_packet;

typedef struct {
    lb_dl_packet *head, *tail;
    int64_t last_ns; /* release time of the pair's previous packet */
} lb_dl_queue;

/* Mirrored by a ctypes.Structure in lowband/wan/_delayline.py: keep the two in step. */
typedef struct {
    uint64_t packets, bytes, dropped_loss, dropped_cut, dropped_full, unknown, write_errors;
    uint64_t late_over_1ms, max_held;
    double late_max_s, late_sum_s;
    double write_s; /* time inside write(): the kernel forwards the packet inline, downstream too */
} lb_dl_stats;

typedef struct lb_dl {
    int nfds, n, hdr;
    int *fds;
    uint32_t *hosts; /* IPv4 addresses as the packet holds them (network byte order) */
    double *delay, *jitter, loss;
    uint64_t rng_jitter, rng_loss;
    int64_t cap_bytes, held_bytes;
    uint64_t held;
    lb_dl_queue *q;   /* n * n pairs, src * n + dst */
    int *heap, heap_len;
    unsigned char *cut;  /* n * n, symmetric; atomic access */
    int64_t *stall_ns;   /* per host; atomic access */
    int stop_fd;
    lb_dl_stats st, pub; /* the loop's own counters, and the copy lb_dl_stats reads */
    pthread_mutex_t lock;
    unsigned char *scratch;
} lb_dl;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* splitmix64: a small seeded generator; the jitter and the loss draw from separate streams. */
static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static double rng_uniform(uint64_t *s) { return (double)(rng_next(s) >> 11) * 0x1.0p-53; }

/* -- the heap of non-empty pairs, keyed by their head packet's release time ------------------ */
static int64_t key(const lb_dl *dl, int i) { return dl->q[dl->heap[i]].head->release_ns; }

static void swap(int *a, int *b) {
    int t = *a;
    *a = *b;
    *b = t;
}

static void sift_up(lb_dl *dl, int i) {
    while (i > 0) {
        int parent = (i - 1) / 2;
        if (key(dl, parent) <= key(dl, i)) break;
        swap(&dl->heap[parent], &dl->heap[i]);
        i = parent;
    }
}

static void sift_down(lb_dl *dl, int i) {
    for (;;) {
        int l = 2 * i + 1, r = l + 1, m = i;
        if (l < dl->heap_len && key(dl, l) < key(dl, m)) m = l;
        if (r < dl->heap_len && key(dl, r) < key(dl, m)) m = r;
        if (m == i) return;
        swap(&dl->heap[m], &dl->heap[i]);
        i = m;
    }
}

/* -- packets ---------------------------------------------------------------------------------- */
static int host_of(const lb_dl *dl, const unsigned char *ip) {
    uint32_t a;
    memcpy(&a, ip, 4);
    for (int i = 0; i < dl->n; i++)
        if (dl->hosts[i] == a) return i;
    return -1;
}

static void count_sent(lb_dl *dl, uint32_t len, double late) {
    lb_dl_stats *st = &dl->st;
    st->packets++;
    st->bytes += len - (uint32_t)dl->hdr;
    st->late_sum_s += late;
    if (late > st->late_max_s) st->late_max_s = late;
    if (late > 1e-3) st->late_over_1ms++;
}

static int write_packet(lb_dl *dl, int fd, const unsigned char *data, uint32_t len) {
    int64_t start = now_ns();
    ssize_t w;
    do {
        w = write(fd, data, len);
    } while (w < 0 && errno == EINTR);
    dl->st.write_s += (double)(now_ns() - start) * 1e-9;
    if (w < 0) dl->st.write_errors++; /* the kernel refused it: a loss, as on a real link */
    return w >= 0;
}

/* One packet read from ``fd`` at ``now``: drop it, write it back at once, or queue it. */
static void take(lb_dl *dl, int fd, const unsigned char *pkt, uint32_t len, int64_t now) {
    const unsigned char *ip = pkt + dl->hdr;
    int a = -1, b = -1;
    if (len >= (uint32_t)dl->hdr + 20 && (ip[0] >> 4) == 4) {
        a = host_of(dl, ip + 12);
        b = host_of(dl, ip + 16);
    }
    if (a < 0 || b < 0) { /* not between two hosts: pass it on in arrival order */
        dl->st.unknown++;
        if (write_packet(dl, fd, pkt, len)) count_sent(dl, len, 0.0);
        return;
    }
    if (__atomic_load_n(&dl->cut[a * dl->n + b], __ATOMIC_RELAXED)) {
        dl->st.dropped_cut++;
        return;
    }
    if (dl->loss > 0 && rng_uniform(&dl->rng_loss) < dl->loss) {
        dl->st.dropped_loss++;
        return;
    }
    if (dl->held_bytes + (int64_t)len > dl->cap_bytes) {
        dl->st.dropped_full++;
        return;
    }
    lb_dl_packet *p = malloc(sizeof(lb_dl_packet) + len);
    if (p == NULL) {
        dl->st.dropped_full++;
        return;
    }
    int pair = a * dl->n + b;
    double j = dl->jitter[pair], hold = dl->delay[pair];
    if (j > 0) hold += (2.0 * rng_uniform(&dl->rng_jitter) - 1.0) * j;
    int64_t t = now + (hold > 0 ? llround(hold * 1e9) : 0);
    int64_t sa = __atomic_load_n(&dl->stall_ns[a], __ATOMIC_RELAXED);
    int64_t sb = __atomic_load_n(&dl->stall_ns[b], __ATOMIC_RELAXED);
    lb_dl_queue *q = &dl->q[pair];
    if (sa > t) t = sa;
    if (sb > t) t = sb;
    if (q->last_ns > t) t = q->last_ns;
    q->last_ns = t;

    memcpy(p->data, pkt, len);
    p->next = NULL;
    p->release_ns = t;
    p->fd = fd;
    p->len = len;
    if (q->tail) {
        q->tail->next = p;
        q->tail = p;
    } else {
        q->head = q->tail = p;
        dl->heap[dl->heap_len++] = pair;
        sift_up(dl, dl->heap_len - 1);
    }
    dl->held++;
    dl->held_bytes += len;
    if (dl->held > dl->st.max_held) dl->st.max_held = dl->held;
}

/* Write every packet whose time has come; lateness is measured at each write. */
static void release_due(lb_dl *dl) {
    while (dl->heap_len > 0) {
        lb_dl_queue *q = &dl->q[dl->heap[0]];
        lb_dl_packet *p = q->head;
        int64_t now = now_ns();
        if (p->release_ns > now) return;
        q->head = p->next;
        if (q->head == NULL) {
            q->tail = NULL;
            dl->heap[0] = dl->heap[--dl->heap_len];
        }
        if (dl->heap_len > 0) sift_down(dl, 0);
        if (write_packet(dl, p->fd, p->data, p->len))
            count_sent(dl, p->len, (double)(now - p->release_ns) * 1e-9);
        dl->held--;
        dl->held_bytes -= p->len;
        free(p);
    }
}

static void publish(lb_dl *dl) {
    pthread_mutex_lock(&dl->lock);
    dl->pub = dl->st;
    pthread_mutex_unlock(&dl->lock);
}

/* Read up to a batch from one device; 0, or -errno on a failure other than "nothing left". */
static int read_batch(lb_dl *dl, int fd) {
    for (int k = 0; k < LB_DL_BATCH; k++) {
        ssize_t r = read(fd, dl->scratch, LB_DL_SCRATCH);
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -errno;
        }
        take(dl, fd, dl->scratch, (uint32_t)r, now_ns());
    }
    return 0;
}

/* -- the API Python calls through ctypes -------------------------------------------------------- */
void lb_dl_destroy(lb_dl *dl);

int lb_dl_abi_version(void) { return LB_DL_ABI; }

int lb_dl_stats_size(void) { return (int)sizeof(lb_dl_stats); }

/* fds: the open TUN devices; hosts: n IPv4 addresses, 4 bytes each as on the wire; delay and
 * jitter: n * n seconds, row = source; hdr: bytes before the IP header (the vnet header).
 * NULL on bad arguments or no memory. */
lb_dl *lb_dl_create(const int *fds, int nfds, const unsigned char *hosts, int n,
                    const double *delay, const double *jitter, double loss, uint64_t seed,
                    int hdr, int64_t cap_bytes) {
    if (nfds < 1 || n < 1 || n > LB_DL_MAX_HOSTS || hdr < 0 || hdr > 64 || cap_bytes < 0 ||
        !(loss >= 0.0 && loss <= 1.0))
        return NULL;
    lb_dl *dl = calloc(1, sizeof(lb_dl));
    if (dl == NULL) return NULL;
    dl->stop_fd = -1;
    if (pthread_mutex_init(&dl->lock, NULL) != 0) {
        free(dl);
        return NULL;
    }
    size_t pairs = (size_t)n * (size_t)n;
    dl->nfds = nfds;
    dl->n = n;
    dl->hdr = hdr;
    dl->loss = loss;
    dl->cap_bytes = cap_bytes;
    dl->rng_jitter = seed;
    dl->rng_loss = seed + 1;
    dl->fds = malloc(sizeof(int) * (size_t)nfds);
    dl->hosts = malloc(sizeof(uint32_t) * (size_t)n);
    dl->delay = malloc(sizeof(double) * pairs);
    dl->jitter = malloc(sizeof(double) * pairs);
    dl->q = calloc(pairs, sizeof(lb_dl_queue));
    dl->heap = malloc(sizeof(int) * pairs);
    dl->cut = calloc(pairs, 1);
    dl->stall_ns = calloc((size_t)n, sizeof(int64_t));
    dl->scratch = malloc(LB_DL_SCRATCH);
    dl->stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!dl->fds || !dl->hosts || !dl->delay || !dl->jitter || !dl->q || !dl->heap || !dl->cut ||
        !dl->stall_ns || !dl->scratch || dl->stop_fd < 0) {
        lb_dl_destroy(dl);
        return NULL;
    }
    memcpy(dl->fds, fds, sizeof(int) * (size_t)nfds);
    memcpy(dl->hosts, hosts, 4 * (size_t)n);
    for (size_t i = 0; i < pairs; i++) {
        if (!(delay[i] >= 0.0 && jitter[i] >= 0.0 && delay[i] < 1e6 && jitter[i] < 1e6)) {
            lb_dl_destroy(dl);
            return NULL;
        }
        dl->delay[i] = delay[i];
        dl->jitter[i] = jitter[i];
    }
    return dl;
}

void lb_dl_destroy(lb_dl *dl) {
    if (dl == NULL) return;
    if (dl->q) {
        for (size_t i = 0; i < (size_t)dl->n * (size_t)dl->n; i++) {
            for (lb_dl_packet *p = dl->q[i].head, *next; p; p = next) {
                next = p->next;
                free(p);
            }
        }
    }
    if (dl->stop_fd >= 0) close(dl->stop_fd);
    pthread_mutex_destroy(&dl->lock);
    free(dl->fds);
    free(dl->hosts);
    free(dl->delay);
    free(dl->jitter);
    free(dl->q);
    free(dl->heap);
    free(dl->cut);
    free(dl->stall_ns);
    free(dl->scratch);
    free(dl);
}

/* Cut (on = 1) or restore (on = 0) the path between hosts a and b, both ways. */
int lb_dl_cut(lb_dl *dl, int a, int b, int on) {
    if (a < 0 || b < 0 || a >= dl->n || b >= dl->n) return -EINVAL;
    __atomic_store_n(&dl->cut[a * dl->n + b], (unsigned char)(on != 0), __ATOMIC_RELAXED);
    __atomic_store_n(&dl->cut[b * dl->n + a], (unsigned char)(on != 0), __ATOMIC_RELAXED);
    return 0;
}

/* Hold every packet to or from ``host`` that arrives from now until ``seconds`` from now. */
int lb_dl_stall(lb_dl *dl, int host, double seconds) {
    if (host < 0 || host >= dl->n || !(seconds >= 0.0 && seconds < 1e6)) return -EINVAL;
    int64_t until = now_ns() + llround(seconds * 1e9);
    __atomic_store_n(&dl->stall_ns[host], until, __ATOMIC_RELAXED);
    return 0;
}

void lb_dl_stats_get(lb_dl *dl, lb_dl_stats *out) {
    pthread_mutex_lock(&dl->lock);
    *out = dl->pub;
    pthread_mutex_unlock(&dl->lock);
}

/* Ask lb_dl_run to return; safe from any thread. */
void lb_dl_stop(lb_dl *dl) {
    uint64_t one = 1;
    ssize_t w = write(dl->stop_fd, &one, sizeof one);
    (void)w; /* an eventfd counter that is already non-zero wakes the loop just as well */
}

/* The loop; returns 0 once lb_dl_stop was called, -errno when a device or the wait fails. */
int lb_dl_run(lb_dl *dl) {
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* wake within a microsecond, not 50 */
    struct pollfd *pfd = calloc((size_t)dl->nfds + 1, sizeof(struct pollfd));
    if (pfd == NULL) return -ENOMEM;
    for (int i = 0; i < dl->nfds; i++) pfd[i] = (struct pollfd){.fd = dl->fds[i], .events = POLLIN};
    pfd[dl->nfds] = (struct pollfd){.fd = dl->stop_fd, .events = POLLIN};
    int rc = 0;
    for (;;) {
        release_due(dl);
        publish(dl);
        struct timespec ts, *timeout = NULL;
        if (dl->heap_len > 0) {
            int64_t wait = key(dl, 0) - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000;
            ts.tv_nsec = wait % 1000000000;
            timeout = &ts;
        }
        int r = ppoll(pfd, (nfds_t)dl->nfds + 1, timeout, NULL);
        if (r < 0) {
            if (errno == EINTR) continue;
            rc = -errno;
            break;
        }
        if (pfd[dl->nfds].revents) break;
        for (int i = 0; i < dl->nfds && rc == 0; i++) {
            short ev = pfd[i].revents;
            if (ev & (POLLERR | POLLHUP | POLLNVAL)) rc = -EIO;
            else if (ev & POLLIN) {
                rc = read_batch(dl, dl->fds[i]);
                release_due(dl);
            }
        }
        if (rc != 0) break;
    }
    publish(dl);
    free(pfd);
    return rc;
}
