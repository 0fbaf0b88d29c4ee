// Goroutine lifecycle probes, loaded by otel_goroutines/probes.py with bcc.
//
// Per-goroutine state lives in the `goroutines` map from creation to exit; user space gets one
// end record per goroutine (with its totals) and, at the "states" detail, up to MAX_EVENTS
// state transitions per goroutine. Whatever cannot be delivered is counted in `counters`.
//
// One compiled program serves every traced process of the agent. What differs between processes
// (their binaries' struct offsets, Go version, SDK layout, allocation settings) is in the
// `proc_configs` map (struct proc_config, bpf/records.h), keyed by tgid, filled by probes.py when
// the process is attached: every handler fetches its process's config first. Which handlers run
// for a process is chosen by which probes probes.py attaches to it.
//
// Compile-time parameters (-D, from probes.py: the same for every process of the agent):
//   the features the agent may use for some process: FEATURE_APP_SPANS, FEATURE_LABELS,
//   FEATURE_ALLOCS (their code costs compile time: an agent that will not use one leaves it out);
//   MAX_GOROUTINES, MAX_PROCESSES, RINGBUF_PAGES, MAX_EVENTS;
//   trace boundaries: TRACE_MAX_SPANS, SPAWNER_CHILDREN, SPAWNER_AGE_NS;
//   heap allocations, from allocs.py: ALLOC_COUNT_SHIFT, ALLOC_WEIGHT_STEPS, ALLOC_WEIGHT_ENTRIES,
//   ALLOC_RATE_CAP, DEFAULT_MEMPROFILERATE;
//   Go's interface layout (otel_goroutines/gosdk.py): OFF_ITAB_TYPE, OFF_TYPE_KIND, KIND_MASK,
//   KIND_POINTER, KIND_STRUCT;
//   WAKERS: name who woke each goroutine (note_waker).
#include <uapi/linux/ptrace.h>

// PIDs as the agent numbers them. In the kernel's own PID namespace they are the kernel's; when
// the agent runs in a PID namespace of its own (a sidecar sharing its pod's), probes.py defines
// AGENT_PIDNS_DEV/AGENT_PIDNS_INO (its /proc/self/ns/pid) and every PID below is the one that
// namespace gives, as in the agent's /proc. (A process of another PID namespace reads as 0.)
#ifdef AGENT_PIDNS_INO
static __always_inline u64 agent_pid_tgid(void) {
    struct bpf_pidns_info ns = {};
    bpf_get_ns_current_pid_tgid(AGENT_PIDNS_DEV, AGENT_PIDNS_INO, &ns, sizeof(ns));
    return (u64)ns.tgid << 32 | ns.pid;
}
#define bpf_get_current_pid_tgid agent_pid_tgid
#endif

#include "records.h"
#include "arch.h"  // Go's registers: GO_ARG1(ctx)..., GO_G(ctx), GO_IP(ctx)

#define G_RUNNABLE 1
#define G_RUNNING 2
#define G_WAITING 4
#define G_DEAD 6
#define G_LEAKED 10
#define G_SCAN 0x1000

// Declared first: bcc numbers maps in declaration order, and wake_flags() names this one as map 1.
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_HASH(goroutines, struct gkey, struct gstate, MAX_GOROUTINES);
// Processes being traced -> the time their first thread exited (0 while they run).
BPF_HASH(traced, u32, u64, MAX_PROCESSES);
// Processes being traced -> what their probes need to know (struct proc_config).
BPF_HASH(proc_configs, u32, struct proc_config, MAX_PROCESSES);
// Per-process counters: the rows of proc_config.slot (N_COUNTERS each).
BPF_PERCPU_ARRAY(counters, u64, MAX_PROCESSES * N_COUNTERS);
// Spans per trace (by its root goroutine), for the trace-size cap. Only traces that someone joins
// get an entry: a goroutine that starts a trace counts as its first span without one.
BPF_TABLE("lru_hash", struct gkey, u32, trace_sizes, 65536);
// Histogram of the time from runnable to running (go.schedule.duration); the last slot is the sum in ns.
// SCHED_BUCKETS + 1 slots per process, at its proc_config.slot.
BPF_PERCPU_ARRAY(sched_latency, u64, MAX_PROCESSES * (SCHED_BUCKETS + 1));

// User space drains the ring buffer on a timer; a record wakes it only once the buffer is half
// full. (A wake-up per record costs the target's CPU an irq_work and an IPI, ~1.4 us.) bcc 0.26 has
// no events.ringbuf_query(): the helper is called on the map by its bcc number, 1 (declared first;
// were it not, the verifier would refuse the program: the helper takes only a ring buffer).
#define RINGBUF_BYTES (RINGBUF_PAGES * 4096ULL)
static __always_inline u64 wake_flags(void) {
    return bpf_ringbuf_query((void *)bpf_pseudo_fd(1, -1), BPF_RB_AVAIL_DATA) > RINGBUF_BYTES / 2 ? BPF_RB_FORCE_WAKEUP
                                                                                                 : BPF_RB_NO_WAKEUP;
}

// The config of the process running now (NULL: not traced by this agent).
static __always_inline struct proc_config *current_config(void) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    return proc_configs.lookup(&tgid);
}

static __always_inline void count(struct proc_config *cfg, int which) {
    u32 row = cfg->slot * N_COUNTERS + which;
    u64 *value = counters.lookup(&row);
    if (value)
        (*value)++;
}

// A probe hit in this process, for the overhead budget (shedding.py).
#ifdef FEATURE_BUDGET
#define COUNT_HIT(cfg, which) count(cfg, which)
#else
#define COUNT_HIT(cfg, which)
#endif

static __always_inline u64 read_u64(struct proc_config *cfg, u64 addr) {
    u64 value = 0;
    if (bpf_probe_read_user(&value, sizeof(value), (void *)addr) != 0)
        count(cfg, C_READ_ERROR);
    return value;
}

// The g fields the probes read, fetched in one read of the target's memory (a helper call costs
// ~50 ns; the fields sit within ~180 bytes in every Go version): a state change needs the low part
// (status, goid, waitreason: g_lo_size bytes), a creation the whole window (g_all_size), up to
// parentGoid (Go 1.21+), gopc, startpc. The window starts at the process's g_start; fields are
// read at offsets from there, masked so the verifier sees them inside the scratch buffer.
struct g_win { u8 b[2 * G_WINDOW]; };
BPF_PERCPU_ARRAY(g_scratch, struct g_win, 1);  // too large for the stack beside a struct gstate
#define G_FIELD(win, rel, type) (*(type *)((win)->b + ((rel) & (G_WINDOW - 1))))
#define G_GOID(cfg, win) G_FIELD(win, (cfg)->g_goid, u64)
#define G_STATUS(cfg, win) G_FIELD(win, (cfg)->g_status, u32)
#define G_WAITREASON(cfg, win) G_FIELD(win, (cfg)->g_waitreason, u8)

// size bytes of gp's window, in the per-CPU scratch (NULL if unreadable).
static __always_inline struct g_win *read_g(struct proc_config *cfg, u64 gp, u32 size) {
    u32 zero = 0;
    struct g_win *g = g_scratch.lookup(&zero);
    if (!g)
        return NULL;
    if (bpf_probe_read_user(g, size & (2 * G_WINDOW - 1), (void *)(gp + cfg->g_start)) != 0) {
        count(cfg, C_READ_ERROR);
        return NULL;
    }
    return g;
}

// The goroutine this thread runs: the current g, or, on the system stack (newproc1, goready's
// systemstack(ready), the scheduler), where R14 is the thread's g0, g0.m.curg (0: none).
static __always_inline u64 running_goroutine(struct pt_regs *ctx, struct proc_config *cfg) {
    u64 m = read_u64(cfg, GO_G(ctx) + cfg->off_g_m);
    return m ? read_u64(cfg, m + cfg->off_m_curg) : 0;
}

static __always_inline u32 log2_bucket(u64 v) {
    u32 b = 0;
#pragma unroll
    for (int i = 0; i < SCHED_BUCKETS - 1; i++) {
        if (v >> (b + 1))
            b++;
    }
    return b;
}

// Trace boundaries: a goroutine joins its creator's trace unless the creator is untraced, is a
// long-lived or prolific spawner (accept loop, dispatcher, pool), or its trace is full. Only a
// join touches trace_sizes (an LRU map, the dearest lookup here): a root is its trace's first span.
static __always_inline void assign_trace(struct gkey *key, struct gstate *st, struct gstate *parent, u64 now) {
    st->root_goid = key->goid;
    if (!parent) {
        st->trace_reason = TR_UNTRACED_PARENT;
        return;
    }
    parent->children++;
    st->parent_root_goid = parent->root_goid;
    if (parent->children > SPAWNER_CHILDREN || now - parent->create_ns > SPAWNER_AGE_NS ||
        (parent->flags & FLAG_EXISTED_AT_ATTACH)) {
        st->trace_reason = TR_SPAWNER;
        return;
    }
    struct gkey root = {.tgid = key->tgid, .goid = parent->root_goid};
    u32 *size = trace_sizes.lookup(&root);
    if (size && *size >= TRACE_MAX_SPANS) {
        st->trace_reason = TR_TRACE_FULL;
        return;
    }
    st->trace_reason = TR_JOINS_PARENT;
    st->root_goid = root.goid;
    if (size) {
        __sync_fetch_and_add(size, 1);
    } else {
        u32 two = 2;  // the root and this one
        trace_sizes.update(&root, &two);
    }
}

// --- application traces (otel_goroutines/gosdk.py) and pprof labels (goruntime.py) ---
// A goroutine created while an OpenTelemetry Go SDK span is active on its creator (the newest span
// started there and not yet ended) joins that span's trace, as its child; goroutines it creates follow
// it there by the usual rules. The probes on the SDK keep, per goroutine, the stack of its active spans.
#define APP_ROOT_BIT (1ULL << 63)  // root_goid of goroutines in an application trace: sized per trace, not per goroutine
BPF_PERCPU_ARRAY(app_counters, u64, MAX_PROCESSES * N_APP_COUNTERS);  // N_APP_COUNTERS per process, at its slot

static __always_inline void app_count(struct proc_config *cfg, int which) {
    u32 row = cfg->slot * N_APP_COUNTERS + which;
    u64 *value = app_counters.lookup(&row);
    if (value)
        (*value)++;
}

#ifdef FEATURE_APP_SPANS
#define APP_STACK_DEPTH 8  // a power of two
struct app_span {
    u64 ptr;               // the span object: what End gets as its receiver
    u8 trace_id[16];
    u8 span_id[8];
    u32 flags;             // the span's trace flags (bit 0: sampled)
    u32 pad;
};
struct app_stack {
    u32 depth;
    u32 pad;
    struct app_span spans[APP_STACK_DEPTH];  // oldest first
};
struct span_key {
    u32 tgid;
    u32 pad;
    u64 ptr;
};
// Goroutines with active application spans (entries come and go with spans: not preallocated).
BPF_F_TABLE("hash", struct gkey, struct app_stack, app_stacks, 65536, BPF_F_NO_PREALLOC);
// Span object -> the goroutine it started on, so an End on another goroutine finds it.
BPF_TABLE("lru_hash", struct span_key, u64, app_span_owner, 65536);
BPF_PERCPU_ARRAY(app_scratch, struct app_stack, 1);

// A span starts: `type` is its dynamic Go type (abi.Type), `span` its data pointer.
static __always_inline int app_span_started(struct pt_regs *ctx, struct proc_config *cfg, u64 type, u64 span) {
    u8 kind = 0;
    bpf_probe_read_user(&kind, 1, (void *)(type + OFF_TYPE_KIND));
    u64 sc;
    if ((kind & KIND_MASK) == KIND_POINTER)       // *recordingSpan
        sc = span + cfg->off_rspan_sc;
    else if ((kind & KIND_MASK) == KIND_STRUCT)   // nonRecordingSpan, boxed
        sc = span + cfg->off_nrspan_sc;
    else {
        app_count(cfg, AC_UNKNOWN_SPAN_TYPE);
        return 0;
    }
    struct gkey g = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = read_u64(cfg, GO_G(ctx) + cfg->off_g_goid)};
    if (!g.goid)
        return 0;
    struct app_stack *as = app_stacks.lookup(&g);
    if (!as) {
        u32 zero = 0;
        struct app_stack *empty = app_scratch.lookup(&zero);
        if (!empty)
            return 0;
        empty->depth = 0;
        if (app_stacks.update(&g, empty) != 0) {
            app_count(cfg, AC_STACKS_FULL);
            return 0;
        }
        as = app_stacks.lookup(&g);
        if (!as)
            return 0;
    }
    u32 d = as->depth;
    if (d >= APP_STACK_DEPTH) {  // forget the oldest
#pragma unroll
        for (int i = 0; i < APP_STACK_DEPTH - 1; i++)
            as->spans[i] = as->spans[i + 1];
        d = APP_STACK_DEPTH - 1;
        app_count(cfg, AC_SPANS_DROPPED_DEEP);
    }
    struct app_span *top = &as->spans[d & (APP_STACK_DEPTH - 1)];
    top->ptr = span;
    bpf_probe_read_user(top->trace_id, 16, (void *)(sc + cfg->off_sc_traceid));
    bpf_probe_read_user(top->span_id, 8, (void *)(sc + cfg->off_sc_spanid));
    u8 flags = 0;
    bpf_probe_read_user(&flags, 1, (void *)(sc + cfg->off_sc_flags));
    top->flags = flags;
    as->depth = d + 1;
    struct span_key sk = {.tgid = g.tgid, .ptr = span};
    app_span_owner.update(&sk, &g.goid);
    app_count(cfg, AC_SPANS_STARTED);
    return 0;
}

// At the call context.WithValue(ctx, currentSpanKey, span) in (*tracer).Start: RSI, R8 = the span as
// an `any` (its type, its data).
int on_app_span_start(struct pt_regs *ctx) {
    struct proc_config *cfg = current_config();
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    return app_span_started(ctx, cfg, GO_ARG5(ctx), GO_ARG6(ctx));
}

// At a RET of (*tracer).Start (when the call above is not found): RCX, RDI = the span as a trace.Span
// (itab, data).
int on_app_span_start_ret(struct pt_regs *ctx) {
    struct proc_config *cfg = current_config();
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    return app_span_started(ctx, cfg, read_u64(cfg, GO_ARG3(ctx) + OFF_ITAB_TYPE), GO_ARG4(ctx));
}

// At the entry of (*recordingSpan).End or (*nonRecordingSpan).End: RAX = the span.
int on_app_span_end(struct pt_regs *ctx) {
    struct span_key sk = {.tgid = bpf_get_current_pid_tgid() >> 32, .ptr = GO_ARG1(ctx)};
    struct proc_config *cfg = proc_configs.lookup(&sk.tgid);
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    u64 *owner = app_span_owner.lookup(&sk);
    if (!owner)
        return 0;  // started before the probes, or already ended
    struct gkey g = {.tgid = sk.tgid, .goid = *owner};
    app_span_owner.delete(&sk);
    app_count(cfg, AC_SPANS_ENDED);
    struct app_stack *as = app_stacks.lookup(&g);
    if (!as)
        return 0;
    u32 d = as->depth, found = 0;
#pragma unroll
    for (int i = 0; i < APP_STACK_DEPTH; i++) {  // remove it, keeping the others in order
        if (i >= d)
            break;
        if (as->spans[i].ptr == sk.ptr)
            found = 1;
        if (found && i + 1 < APP_STACK_DEPTH)
            as->spans[i] = as->spans[i + 1];
    }
    if (found)
        as->depth = d - 1;
    if (as->depth == 0)
        app_stacks.delete(&g);
    return 0;
}

// Puts a goroutine whose creator has an active application span into that span's trace, under it;
// returns 0 when the creator has none. Such a goroutine is the child of the application's span
// whatever its creator is (an accept loop, a pool); the trace cap counts per application trace.
static __always_inline int join_app_span(struct proc_config *cfg, struct gkey *key, struct gstate *st, struct gstate *parent) {
    struct gkey creator = {.tgid = key->tgid, .goid = st->parent_goid};
    struct app_stack *as = app_stacks.lookup(&creator);
    if (!as)
        return 0;
    u32 d = as->depth;
    if (d == 0 || d > APP_STACK_DEPTH)
        return 0;
    struct app_span *span = &as->spans[(d - 1) & (APP_STACK_DEPTH - 1)];
    __builtin_memcpy(st->app_trace_id, span->trace_id, 16);
    __builtin_memcpy(st->app_span_id, span->span_id, 8);
    u32 sampled = span->flags & 1 ? APP_SAMPLED : 0;
    if (parent)
        parent->children++;
    u64 low = 0;
    __builtin_memcpy(&low, st->app_trace_id + 8, 8);
    struct gkey root = {.tgid = key->tgid, .goid = APP_ROOT_BIT | low};
    u32 one = 1, *size = trace_sizes.lookup(&root);
    if (size && *size >= TRACE_MAX_SPANS) {  // a trace of its own, linked to the application's span
        st->trace_reason = TR_TRACE_FULL;
        st->app_flags = APP_LINKED | sampled;
        st->root_goid = key->goid;
        return 1;
    }
    st->trace_reason = TR_APP_SPAN;
    st->app_flags = APP_IN_TRACE | sampled;
    st->root_goid = root.goid;
    if (size)
        __sync_fetch_and_add(size, 1);
    else
        trace_sizes.update(&root, &one);
    app_count(cfg, AC_GOROUTINES_JOINED);
    return 1;
}

// A goroutine created with no application span active follows its creator: into the application's
// trace when it joins its creator's trace, else (spawner, full trace) linked to it.
static __always_inline void follow_app_trace(struct gstate *st, struct gstate *parent) {
    if (!parent || !(parent->app_flags & APP_IN_TRACE))
        return;
    __builtin_memcpy(st->app_trace_id, parent->app_trace_id, 16);
    st->app_flags = (st->trace_reason == TR_JOINS_PARENT ? APP_IN_TRACE : APP_LINKED) | (parent->app_flags & APP_SAMPLED);
}
#endif

// Which trace a new goroutine is in: an application span's, else by the trace boundaries.
static __always_inline void place_in_trace(struct proc_config *cfg, struct gkey *key, struct gstate *st, struct gstate *parent,
                                           u64 now) {
#ifdef FEATURE_APP_SPANS
    int app = cfg->flags & CFG_APP_SPANS;
    if (app && join_app_span(cfg, key, st, parent))
        return;
#endif
    assign_trace(key, st, parent, now);
#ifdef FEATURE_APP_SPANS
    if (app)
        follow_app_trace(st, parent);
#endif
}

#ifdef FEATURE_LABELS
// runtime/pprof goroutine labels: g.labels points to a labelMap, a map[string]string up to Go 1.23
// (the pointer is to the map variable), a struct{ []struct{key, value string} } from Go 1.24.
static __always_inline void read_label(struct label *l, u64 header) {
    u64 s[4] = {};  // key ptr, key len, value ptr, value len
    bpf_probe_read_user(s, sizeof(s), (void *)header);
    l->key_len = s[1] > 0xffff ? 0xffff : s[1];
    l->value_len = s[3] > 0xffff ? 0xffff : s[3];
    u32 n = s[1] < LABEL_KEY_MAX ? s[1] : LABEL_KEY_MAX;
    bpf_probe_read_user(l->key, n & (2 * LABEL_KEY_MAX - 1), (void *)s[0]);
    n = s[3] < LABEL_VALUE_MAX ? s[3] : LABEL_VALUE_MAX;
    bpf_probe_read_user(l->value, n & (2 * LABEL_VALUE_MAX - 1), (void *)s[2]);
}

// The labels of a Go 1.24+ labelMap, a struct{ []struct{key, value string} }, into ev; how many.
static __always_inline u32 read_label_list(struct labels_event *ev, u64 labels) {
    u64 list[2] = {};  // data pointer, length
    bpf_probe_read_user(list, sizeof(list), (void *)labels);
    ev->total = list[1];
    u32 count = 0;
#pragma unroll
    for (int i = 0; i < MAX_LABELS; i++) {
        if (i >= list[1])
            break;
        read_label(&ev->labels[i], list[0] + 32 * i);
        count++;
    }
    return count;
}

// The labels of a labelMap up to Go 1.23, a map[string]string (`labels` points to the map
// variable), into ev; how many. hmap: count at 0, B at 9, buckets at 16. A labelMap is filled
// once, up to 8 entries in one bucket (B = 0): tophash[8], then 8 string keys, then 8 string
// values. Larger maps are counted only.
static __always_inline u32 read_label_map(struct proc_config *cfg, struct labels_event *ev, u64 labels) {
    u64 h = read_u64(cfg, labels);
    u64 hdr[3] = {};
    if (h)
        bpf_probe_read_user(hdr, sizeof(hdr), (void *)h);
    ev->total = hdr[0];
    u8 b = hdr[1] >> 8;
    u8 tophash[8] = {};
    if (b == 0 && hdr[2])
        bpf_probe_read_user(tophash, sizeof(tophash), (void *)hdr[2]);
    u32 count = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        if (tophash[i] < 5)  // empty (minTopHash = 5)
            continue;
        u64 s[4] = {};
        bpf_probe_read_user(&s[0], 16, (void *)(hdr[2] + 8 + 16 * i));
        bpf_probe_read_user(&s[2], 16, (void *)(hdr[2] + 8 + 128 + 16 * i));
        struct label *l = &ev->labels[count & (MAX_LABELS - 1)];
        l->key_len = s[1] > 0xffff ? 0xffff : s[1];
        l->value_len = s[3] > 0xffff ? 0xffff : s[3];
        u32 n = s[1] < LABEL_KEY_MAX ? s[1] : LABEL_KEY_MAX;
        bpf_probe_read_user(l->key, n & (2 * LABEL_KEY_MAX - 1), (void *)s[0]);
        n = s[3] < LABEL_VALUE_MAX ? s[3] : LABEL_VALUE_MAX;
        bpf_probe_read_user(l->value, n & (2 * LABEL_VALUE_MAX - 1), (void *)s[2]);
        count++;
    }
    return count;
}

// Sends the labels of goroutine gp, if it has any, ahead of its end record.
static __always_inline void send_labels(struct proc_config *cfg, struct gkey *key, u64 gp) {
    u64 labels = 0;
    bpf_probe_read_user(&labels, sizeof(labels), (void *)(gp + cfg->off_g_labels));
    if (!labels)
        return;
    struct labels_event *ev = events.ringbuf_reserve(sizeof(struct labels_event));
    if (!ev) {
        app_count(cfg, AC_LABELS_LOST);
        return;
    }
    ev->kind = EV_LABELS;
    ev->tgid = key->tgid;
    ev->goid = key->goid;
    ev->count = cfg->flags & CFG_LABELS_SLICE ? read_label_list(ev, labels) : read_label_map(cfg, ev, labels);
    events.ringbuf_submit(ev, wake_flags());
    app_count(cfg, AC_LABELS_SENT);
}
#endif

// A goroutine ends: forget its active application spans; send its pprof labels (if it is tracked).
static __always_inline void app_goroutine_ended(struct proc_config *cfg, struct gkey *key, u64 gp, int tracked) {
#ifdef FEATURE_APP_SPANS
    if (cfg->flags & CFG_APP_SPANS)
        app_stacks.delete(key);
#endif
#ifdef FEATURE_LABELS
    if (tracked && (cfg->flags & (CFG_LABELS_MAP | CFG_LABELS_SLICE)))
        send_labels(cfg, key, gp);
#endif
}

static __always_inline u32 state_index(u32 status) {
    status &= ~G_SCAN;
    return status < N_STATES ? status : 0;
}

// A goroutine is created: g is its complete window (goid, startpc, gopc and parentGoid set),
// `status` its first status.
static __always_inline void goroutine_created(struct pt_regs *ctx, struct proc_config *cfg, u32 tgid, struct g_win *g, u32 status) {
    u64 now = bpf_ktime_get_ns();
    struct gkey key = {.tgid = tgid, .goid = G_GOID(cfg, g)};
    struct gstate st = {};
    st.create_ns = now;
    st.last_ns = now;
    st.start_pc = G_FIELD(g, cfg->g_startpc, u64);
    st.go_pc = G_FIELD(g, cfg->g_gopc, u64);
    st.status = state_index(status);
    if (cfg->flags & CFG_PARENT_GOID) {
        st.parent_goid = G_FIELD(g, cfg->g_parentgoid, u64);
    } else {
        u64 curg = running_goroutine(ctx, cfg);  // newproc1 runs on the system stack: the creator is g0.m.curg
        st.parent_goid = curg ? read_u64(cfg, curg + cfg->off_g_goid) : 0;
    }
    if (!cfg->probe_ip)
        cfg->probe_ip = PT_REGS_IP(ctx);
    struct gkey parent = {.tgid = tgid, .goid = st.parent_goid};
    struct gstate *parent_st = goroutines.lookup(&parent);
    st.parent_traced = parent_st != NULL;
    place_in_trace(cfg, &key, &st, parent_st, now);
    count(cfg, C_CREATED);
    if (goroutines.update(&key, &st) != 0)
        count(cfg, C_MAP_FULL);
}

// A goroutine ends (its casgstatus(gp, _Grunning, _Gdead)): its record goes to user space whole.
static __always_inline void goroutine_exited(struct proc_config *cfg, u32 tgid, u64 gp, u64 goid) {
    struct gkey key = {.tgid = tgid, .goid = goid};
    struct gstate *st = goroutines.lookup(&key);
    app_goroutine_ended(cfg, &key, gp, st != NULL);
    if (!st) {
        count(cfg, C_UNTRACKED_EXIT);
        return;
    }
    u64 now = bpf_ktime_get_ns();
    st->state_ns[state_index(st->status)] += now - st->last_ns;
    st->last_ns = now;
    st->end_ns = now;
    st->status = G_DEAD;
    struct end_event *ev = events.ringbuf_reserve(sizeof(struct end_event));
    if (!ev) {
        // Keep the finished record in the map: user space collects it later, so it is late, not lost.
        count(cfg, C_END_DEFERRED);
        return;
    }
    ev->kind = EV_END;
    ev->tgid = tgid;
    ev->goid = goid;
    __builtin_memcpy(&ev->st, st, sizeof(*st));
    events.ringbuf_submit(ev, wake_flags());
    goroutines.delete(&key);
}

// At the call casgstatus(newg, _Gdead, status) in runtime.newproc1 (Go 1.24+), or at its RET: RAX = the new g, complete.
int on_goroutine_created(struct pt_regs *ctx) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_config *cfg = proc_configs.lookup(&tgid);
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_CREATE);
#ifdef FEATURE_BUDGET
    if (cfg->flags & CFG_STATES_COVER_LIFECYCLE)
        return 0;  // the budget attached it before turning the states probe off: casgstatus sees creations until then
#endif
    struct g_win *g = read_g(cfg, GO_ARG1(ctx), cfg->g_all_size);
    if (!g)
        return 0;
    u32 status = G_STATUS(cfg, g);
    if (state_index(status) == 0)       // newproc1's casgstatus(fresh g, _Gidle, _Gdead): no goid yet
        return 0;
    if (state_index(status) == G_DEAD)  // its casgstatus(newg, _Gdead, RCX): the g is complete, not yet switched
        status = (u32)GO_ARG3(ctx);
    goroutine_created(ctx, cfg, tgid, g, status);
    return 0;
}

// At the call casgstatus(gp, _Grunning, _Gdead) that ends a goroutine: RAX = gp, RCX = new status.
int on_goroutine_exit(struct pt_regs *ctx) {
    if ((u32)GO_ARG3(ctx) != G_DEAD)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_config *cfg = proc_configs.lookup(&tgid);
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_EXIT);
#ifdef FEATURE_BUDGET
    if (cfg->flags & CFG_STATES_COVER_LIFECYCLE)
        return 0;  // as above: casgstatus sees exits until the flag is cleared
#endif
    struct g_win *lo = read_g(cfg, GO_ARG1(ctx), cfg->g_lo_size);
    if (lo)
        goroutine_exited(cfg, tgid, GO_ARG1(ctx), G_GOID(cfg, lo));
    return 0;
}

// Time in the state left, and the runnable-to-running latency histogram.
static __always_inline void account_state(struct proc_config *cfg, struct gstate *st, u32 to, u64 now) {
    u64 spent = now - st->last_ns;
    st->state_ns[state_index(st->status)] += spent;
    if (st->status == G_RUNNABLE && state_index(to) == G_RUNNING) {
        u32 row = cfg->slot * (SCHED_BUCKETS + 1);
        u32 bucket = row + log2_bucket(spent), sum_slot = row + SCHED_BUCKETS;
        u64 *n = sched_latency.lookup(&bucket), *sum = sched_latency.lookup(&sum_slot);
        if (n)
            (*n)++;
        if (sum)
            *sum += spent;
    }
    st->last_ns = now;
    st->status = state_index(to);
    st->transitions++;
}

// A wake (waiting -> runnable): who was running on this thread (casgstatus for a wake runs on the
// system stack: m.curg; none when the scheduler or sysmon itself wakes it: timers, netpoll). User
// space names the call site (wake_pc) and so tells the runtime's own wakes (injectglist) from a goroutine's.
static __always_inline void note_waker(struct pt_regs *ctx, struct proc_config *cfg, struct transition_event *ev, u32 tgid,
                                       struct g_win *lo) {
    ev->waitreason = G_WAITREASON(cfg, lo);  // still the ended wait's: the runtime clears it only in gdestroy
    ev->wake_pc = GO_RETURN_ADDR(ctx, cfg);
    u64 curg = running_goroutine(ctx, cfg);
    struct gkey waker = {.tgid = tgid, .goid = curg ? read_u64(cfg, curg + cfg->off_g_goid) : 0};
    if (!waker.goid)
        return;
    ev->waker = WAKER_GOROUTINE;
    ev->waker_goid = waker.goid;
    struct gstate *st = goroutines.lookup(&waker);
    if (!st)
        return;
    ev->waker |= st->app_flags & APP_IN_TRACE ? WAKER_APP_TRACE : WAKER_TRACED;
    if (!(st->flags & FLAG_WOKE_OTHERS))  // written once: the entry's cache line stays clean after
        st->flags |= FLAG_WOKE_OTHERS;
    ev->waker_root = st->root_goid;
    ev->waker_start_pc = st->start_pc;
}

// At the entry of runtime.casgstatus(gp, oldval, newval): RAX = gp, RBX = oldval, RCX = newval.
// With CFG_STATES_COVER_LIFECYCLE (Go 1.24+, where newproc1 assigns the goid before making the g
// runnable) this one probe also sees creations and exits: no trap of their own.
int on_casgstatus(struct pt_regs *ctx) {
    u32 from = GO_ARG2(ctx), to = GO_ARG3(ctx);
    if (from == to)
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct proc_config *cfg = proc_configs.lookup(&tgid);
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_STATE);
    int lifecycle = cfg->flags & CFG_STATES_COVER_LIFECYCLE;
    if (!lifecycle && (from == G_DEAD || to == G_DEAD))
        return 0;  // creation and exit are the lifecycle probes' job
    u64 gp = GO_ARG1(ctx);
    if (lifecycle && from == G_DEAD) {  // newproc1's casgstatus(newg, _Gdead, _Grunnable or _Gwaiting)
        struct g_win *g = (to == G_RUNNABLE || to == G_WAITING) ? read_g(cfg, gp, cfg->g_all_size) : NULL;
        if (g)
            goroutine_created(ctx, cfg, tgid, g, to);
        return 0;
    }
    struct g_win *lo = read_g(cfg, gp, cfg->g_lo_size);
    if (!lo)
        return 0;
    if (lifecycle && to == G_DEAD) {    // gdestroy's casgstatus(gp, _Grunning, _Gdead)
        if (from == G_RUNNING)
            goroutine_exited(cfg, tgid, gp, G_GOID(cfg, lo));
        return 0;
    }
    struct gkey key = {.tgid = tgid, .goid = G_GOID(cfg, lo)};
    struct gstate *st = goroutines.lookup(&key);
    if (!st)
        return 0;
    u64 now = bpf_ktime_get_ns();
    account_state(cfg, st, to, now);
    u8 reason = 0;
    if (st->status == G_WAITING || st->status == G_LEAKED)  // gopark stored it in gp.waitreason before this call
        reason = G_WAITREASON(cfg, lo);
    st->waitreason = reason;
    if (st->events_sent >= MAX_EVENTS && state_index(to) != G_LEAKED) {  // a leak is always reported
        st->events_left_out++;
        return 0;
    }
    struct transition_event *ev = events.ringbuf_reserve(sizeof(struct transition_event));
    if (!ev) {
        st->events_left_out++;
        count(cfg, C_EVENTS_LOST);
        return 0;
    }
    ev->kind = EV_TRANSITION;
    ev->tgid = tgid;
    ev->goid = key.goid;
    ev->ts = now;
    ev->from = from;
    ev->to = to;
    ev->waitreason = reason;
    ev->waker = 0;
    ev->waker_goid = ev->waker_root = ev->wake_pc = ev->waker_start_pc = 0;
#ifdef WAKERS
    if (from == G_WAITING && to == G_RUNNABLE)
        note_waker(ctx, cfg, ev, tgid, lo);
#endif
    events.ringbuf_submit(ev, wake_flags());
    st->events_sent++;
    return 0;
}

// The moment a traced process ends: goroutines still alive end with it. Sent once per process.
TRACEPOINT_PROBE(sched, sched_process_exit) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u64 *exited = traced.lookup(&tgid);
    if (!exited || *exited)
        return 0;
    *exited = bpf_ktime_get_ns();
    struct transition_event *ev = events.ringbuf_reserve(sizeof(struct transition_event));
    if (!ev)
        return 0;  // user space also notices the exit through its pidfd
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = EV_PROCESS_EXIT;
    ev->tgid = tgid;
    ev->ts = *exited;
    events.ringbuf_submit(ev, BPF_RB_FORCE_WAKEUP);
    return 0;
}

// --- heap allocations (--allocs; the estimate math is explained in otel_goroutines/allocs.py) ---
#ifdef FEATURE_ALLOCS
#define ALLOC_COUNT_UNIT (1ULL << ALLOC_COUNT_SHIFT)
// Allocations no goroutine span holds: made on a system stack (g0, gsignal: goid 0), or by a
// goroutine that is not in the map (it predates the probes, or the map was full).
enum alloc_owner { ALLOC_SYSTEM_STACK = 0, ALLOC_UNTRACKED = 1, N_ALLOC_OWNERS = 2 };
struct alloc_totals {
    u64 bytes;
    u64 count;    // in 1/ALLOC_COUNT_UNIT
    u64 samples;
};
BPF_PERCPU_ARRAY(allocs_elsewhere, struct alloc_totals, MAX_PROCESSES * N_ALLOC_OWNERS);  // per process, at its slot

// Adds to the totals of the goroutine running now: R14 is the current g in Go's register ABI.
// A goroutine runs on one thread at a time, so its own totals need no atomics.
static __always_inline void add_alloc(struct pt_regs *ctx, struct proc_config *cfg, u64 bytes, u64 allocs, u64 samples) {
    u64 goid = read_u64(cfg, GO_G(ctx) + cfg->off_g_goid);
    struct gkey key = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = goid};
    struct gstate *st = goid ? goroutines.lookup(&key) : NULL;
    if (st) {
        st->alloc_bytes += bytes;
        st->alloc_count += allocs;
        st->alloc_samples += samples;
        return;
    }
    u32 owner = cfg->slot * N_ALLOC_OWNERS + (goid ? ALLOC_UNTRACKED : ALLOC_SYSTEM_STACK);
    struct alloc_totals *t = allocs_elsewhere.lookup(&owner);
    if (t) {
        t->bytes += bytes;
        t->count += allocs;
        t->samples += samples;
    }
}

// mallocgc(size, typ, needzero) after its stack check: RAX = the requested size.
int on_mallocgc(struct pt_regs *ctx) {
    struct proc_config *cfg = current_config();
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    u64 size = GO_ARG1(ctx);
    // 0: no allocation (zerobase); up to specialized_malloc_max: mallocgc passes it on to a
    // size-specialized entry, whose own probe counts it.
    if (size <= cfg->specialized_malloc_max)
        return 0;
    add_alloc(ctx, cfg, size, ALLOC_COUNT_UNIT, 0);
    return 0;
}

// mallocgcSmallNoScanSC<n> and the like (same arguments), called by mallocgc and by compiled code.
int on_malloc_specialized(struct pt_regs *ctx) {
    struct proc_config *cfg = current_config();
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    add_alloc(ctx, cfg, GO_ARG1(ctx), ALLOC_COUNT_UNIT, 0);
    return 0;
}

// h(x) = 1/(1-exp(-x)) - 1/x at x = (i + 1/2) / ALLOC_WEIGHT_STEPS, in 1/ALLOC_COUNT_UNIT; filled by user space.
BPF_ARRAY(alloc_weights, u32, ALLOC_WEIGHT_ENTRIES);

// profilealloc(mp, x, size) after its stack check: RCX = the size of the sampled allocation.
// A sample of size s at rate r stands for 1/p allocations and s/p bytes, p = 1 - exp(-s/r).
int on_profilealloc(struct pt_regs *ctx) {
    struct proc_config *cfg = current_config();
    if (!cfg)
        return 0;
    COUNT_HIT(cfg, C_HITS_OTHER);
    u64 size = GO_ARG3(ctx);
    u64 rate = DEFAULT_MEMPROFILERATE;
    if (cfg->flags & CFG_MEMPROFILERATE)  // runtime.MemProfileRate, at its link-time address moved by the load bias of a PIE
        rate = read_u64(cfg, cfg->memprofilerate_addr + PT_REGS_IP(ctx) - cfg->profilealloc_probe_addr);
    if (!size)
        return 0;
    if ((s64)rate <= 1) {  // every allocation is sampled (or the rate is unknown): no scaling, as pprof
        add_alloc(ctx, cfg, size, ALLOC_COUNT_UNIT, 1);
        return 0;
    }
    if (rate > ALLOC_RATE_CAP)  // runtime.fastexprand caps the mean at this
        rate = ALLOC_RATE_CAP;
    u64 index = size * ALLOC_WEIGHT_STEPS / rate;
    if (index >= ALLOC_WEIGHT_ENTRIES) {  // s >= 16 r: sampled for sure (to 1e-7)
        add_alloc(ctx, cfg, size, ALLOC_COUNT_UNIT, 1);
        return 0;
    }
    u32 i = index;
    u32 *hq = alloc_weights.lookup(&i);
    if (!hq)
        return 0;
    add_alloc(ctx, cfg, rate + ((size * *hq) >> ALLOC_COUNT_SHIFT), (rate << ALLOC_COUNT_SHIFT) / size + *hq, 1);
    return 0;
}

// runtime.gcenable: the runtime has initialised (its MemProfileRate is final) and the program's
// own init has not started. User space may turn heap sampling on now.
int on_runtime_initialised(struct pt_regs *ctx) {
    struct transition_event *ev = events.ringbuf_reserve(sizeof(struct transition_event));
    if (!ev)
        return 0;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->kind = EV_RUNTIME_INITIALISED;
    ev->tgid = bpf_get_current_pid_tgid() >> 32;
    ev->ts = bpf_ktime_get_ns();
    events.ringbuf_submit(ev, BPF_RB_FORCE_WAKEUP);  // the agent turns heap sampling on now, not at its next drain
    return 0;
}
#endif

#ifdef FEATURE_BUDGET
// Does nothing: attached by the overhead budget (shedding.py) to a site in the agent's own process
// for a moment at start, to measure what a trap plus a BPF run costs on this machine. A function of
// its own: the other handlers do not change.
int on_calibrate(struct pt_regs *ctx) {
    return 0;
}
#endif
