// Goroutine lifecycle probes, loaded by otel_goroutines/probes.py with bcc.
//
// Per-goroutine state lives in the `goroutines` map from creation to exit; user space gets one
// end record per goroutine (with its totals) and, at the "states" detail, up to MAX_EVENTS
// state transitions per goroutine. Whatever cannot be delivered is counted in `counters`.
//
// Compile-time parameters (-D, from otel_goroutines/goruntime.py and probes.py):
//   OFF_G_GOID, OFF_G_GOPC, OFF_G_STARTPC, OFF_G_WAITREASON, OFF_G_ATOMICSTATUS, OFF_G_M,
//   OFF_M_CURG, optionally OFF_G_PARENTGOID; MAX_GOROUTINES, RINGBUF_PAGES, MAX_EVENTS;
//   trace boundaries: TRACE_MAX_SPANS, SPAWNER_CHILDREN, SPAWNER_AGE_NS;
//   heap allocations: ALLOCS_EXACT (SPECIALIZED_MALLOC_MAX) or ALLOCS_SAMPLED (MEMPROFILERATE_ADDR,
//   PROFILEALLOC_PROBE_ADDR), and from allocs.py ALLOC_COUNT_SHIFT, ALLOC_WEIGHT_STEPS,
//   ALLOC_WEIGHT_ENTRIES, ALLOC_RATE_CAP, DEFAULT_MEMPROFILERATE.
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

#define N_STATES 12
#define G_RUNNABLE 1
#define G_RUNNING 2
#define G_WAITING 4
#define G_DEAD 6
#define G_LEAKED 10
#define G_SCAN 0x1000
#define SCHED_BUCKETS 40  // log2(ns) buckets of the time runnable before running

// Why a goroutine starts a trace of its own instead of joining its creator's.
enum trace_reason { TR_JOINS_PARENT = 0, TR_UNTRACED_PARENT = 1, TR_SPAWNER = 2, TR_TRACE_FULL = 3 };
#define FLAG_EXISTED_AT_ATTACH 1

enum event_kind { EV_TRANSITION = 1, EV_END = 2, EV_PROCESS_EXIT = 3, EV_RUNTIME_INITIALISED = 4 };
enum counter {
    C_MAP_FULL = 0,        // goroutine not tracked: the map was full (its span is lost, counted)
    C_EVENTS_LOST = 1,     // transition events the ring buffer had no room for
    C_END_DEFERRED = 2,    // end records left in the map for user space to collect (ring buffer full)
    C_UNTRACKED_EXIT = 3,  // exits of goroutines created before the probes were attached
    C_READ_ERROR = 4,      // target memory that could not be read
    C_CREATED = 5,         // goroutines created (not a loss; for the live count)
    N_COUNTERS = 6,
};

struct gkey {
    u32 tgid;
    u32 pad;
    u64 goid;
};

struct gstate {
    u64 create_ns;
    u64 end_ns;          // 0 while the goroutine lives
    u64 last_ns;         // time of the last state change
    u64 parent_goid;
    u64 start_pc;
    u64 go_pc;
    u64 state_ns[N_STATES];
    u32 status;
    u32 transitions;
    u32 events_sent;
    u32 events_left_out;
    u32 parent_traced;
    u32 pad;
    u64 root_goid;       // the goroutine whose trace this one is in (itself when it starts one)
    u64 parent_root_goid;  // the creator's trace, for the link when this one starts its own
    u32 children;        // goroutines it created
    u32 trace_reason;    // enum trace_reason
    u32 flags;
    u32 waitreason;      // of the current wait, when status is waiting
    u64 alloc_bytes;     // heap bytes it allocated (--allocs; sampled: an estimate)
    u64 alloc_count;     // heap allocations, in 1/ALLOC_COUNT_UNIT (sampled: an estimate)
    u64 alloc_samples;   // heap-profile samples the estimate rests on (sampled)
};

struct transition_event {
    u32 kind;
    u32 tgid;
    u64 goid;
    u64 ts;
    u32 from;
    u32 to;
    u32 waitreason;
    u32 pad;
};

struct end_event {
    u32 kind;
    u32 tgid;
    u64 goid;
    struct gstate st;
};

BPF_HASH(goroutines, struct gkey, struct gstate, MAX_GOROUTINES);
// Processes being traced -> the time their first thread exited (0 while they run).
BPF_HASH(traced, u32, u64, 1024);
// The address at which each process hit the creation probe: user space derives a PIE's load bias from it.
BPF_HASH(probe_ips, u32, u64, 1024);
BPF_PERCPU_ARRAY(counters, u64, N_COUNTERS);
// Spans per trace (by its root goroutine), for the trace-size cap.
BPF_TABLE("lru_hash", struct gkey, u32, trace_sizes, 65536);
// Goroutines created and exited per start function, for metrics (bounded: the map's size).
struct start_counts {
    u64 created;
    u64 exited;
};
BPF_HASH(by_start_pc, u64, struct start_counts, 4096);
// Histogram of the time from runnable to running (go.schedule.duration); the last slot is the sum in ns.
BPF_PERCPU_ARRAY(sched_latency, u64, SCHED_BUCKETS + 1);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

static __always_inline void count(int which) {
    u64 *value = counters.lookup(&which);
    if (value)
        (*value)++;
}

static __always_inline u64 read_u64(u64 addr) {
    u64 value = 0;
    if (bpf_probe_read_user(&value, sizeof(value), (void *)addr) != 0)
        count(C_READ_ERROR);
    return value;
}

static __always_inline void count_start(u64 start_pc, int exited) {
    struct start_counts zero = {}, *c = by_start_pc.lookup_or_try_init(&start_pc, &zero);
    if (!c)
        return;  // map full: the totals still count it; only the per-function split misses it
    if (exited)
        __sync_fetch_and_add(&c->exited, 1);
    else
        __sync_fetch_and_add(&c->created, 1);
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
// long-lived or prolific spawner (accept loop, dispatcher, pool), or its trace is full.
static __always_inline void assign_trace(struct gkey *key, struct gstate *st, struct gstate *parent, u64 now) {
    struct gkey root = {.tgid = key->tgid};
    if (!parent) {
        st->trace_reason = TR_UNTRACED_PARENT;
    } else {
        parent->children++;
        root.goid = parent->root_goid;
        st->parent_root_goid = parent->root_goid;
        u32 *size = trace_sizes.lookup(&root);
        if (parent->children > SPAWNER_CHILDREN || now - parent->create_ns > SPAWNER_AGE_NS ||
            (parent->flags & FLAG_EXISTED_AT_ATTACH))
            st->trace_reason = TR_SPAWNER;
        else if (size && *size >= TRACE_MAX_SPANS)
            st->trace_reason = TR_TRACE_FULL;
        else {
            st->trace_reason = TR_JOINS_PARENT;
            st->root_goid = root.goid;
            if (size)
                __sync_fetch_and_add(size, 1);
            return;
        }
    }
    st->root_goid = key->goid;
    root.goid = key->goid;
    u32 one = 1;
    trace_sizes.update(&root, &one);
}

static __always_inline u32 state_index(u32 status) {
    status &= ~G_SCAN;
    return status < N_STATES ? status : 0;
}

// At the call casgstatus(newg, _Gdead, status) in runtime.newproc1 (Go 1.21+), or at its RET: RAX = the new g, complete.
int on_goroutine_created(struct pt_regs *ctx) {
    u64 newg = ctx->ax;
    u64 now = bpf_ktime_get_ns();
    struct gkey key = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = read_u64(newg + OFF_G_GOID)};
    struct gstate st = {};
    st.create_ns = now;
    st.last_ns = now;
    st.start_pc = read_u64(newg + OFF_G_STARTPC);
    st.go_pc = read_u64(newg + OFF_G_GOPC);
    u32 status = 0;
    bpf_probe_read_user(&status, sizeof(status), (void *)(newg + OFF_G_ATOMICSTATUS));
    if (state_index(status) == 0)       // newproc1's casgstatus(fresh g, _Gidle, _Gdead): no goid yet
        return 0;
    if (state_index(status) == G_DEAD)  // its casgstatus(newg, _Gdead, RCX): the g is complete, not yet switched
        status = (u32)ctx->cx;
    st.status = state_index(status);
#ifdef OFF_G_PARENTGOID
    st.parent_goid = read_u64(newg + OFF_G_PARENTGOID);
#else
    // newproc1 runs on the system stack: R14 is g0, and g0.m.curg is the creating goroutine.
    u64 m = read_u64(ctx->r14 + OFF_G_M);
    u64 curg = m ? read_u64(m + OFF_M_CURG) : 0;
    st.parent_goid = curg ? read_u64(curg + OFF_G_GOID) : 0;
#endif
    u64 ip = PT_REGS_IP(ctx);
    probe_ips.insert(&key.tgid, &ip);
    struct gkey parent = {.tgid = key.tgid, .goid = st.parent_goid};
    struct gstate *parent_st = goroutines.lookup(&parent);
    st.parent_traced = parent_st != NULL;
    assign_trace(&key, &st, parent_st, now);
    count(C_CREATED);
    count_start(st.start_pc, 0);
    if (goroutines.update(&key, &st) != 0)
        count(C_MAP_FULL);
    return 0;
}

// At the call casgstatus(gp, _Grunning, _Gdead) that ends a goroutine: RAX = gp, RCX = new status.
int on_goroutine_exit(struct pt_regs *ctx) {
    if ((u32)ctx->cx != G_DEAD)
        return 0;
    u64 now = bpf_ktime_get_ns();
    struct gkey key = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = read_u64(ctx->ax + OFF_G_GOID)};
    struct gstate *st = goroutines.lookup(&key);
    if (!st) {
        count(C_UNTRACKED_EXIT);
        return 0;
    }
    st->state_ns[state_index(st->status)] += now - st->last_ns;
    st->last_ns = now;
    st->end_ns = now;
    st->status = G_DEAD;
    count_start(st->start_pc, 1);
    struct end_event *ev = events.ringbuf_reserve(sizeof(struct end_event));
    if (!ev) {
        // Keep the finished record in the map: user space collects it at the end, so it is late, not lost.
        count(C_END_DEFERRED);
        return 0;
    }
    ev->kind = EV_END;
    ev->tgid = key.tgid;
    ev->goid = key.goid;
    __builtin_memcpy(&ev->st, st, sizeof(*st));
    events.ringbuf_submit(ev, 0);
    goroutines.delete(&key);
    return 0;
}

// At the entry of runtime.casgstatus(gp, oldval, newval): RAX = gp, RBX = oldval, RCX = newval.
int on_casgstatus(struct pt_regs *ctx) {
    u32 from = ctx->bx, to = ctx->cx;
    if (from == G_DEAD || to == G_DEAD || from == to)
        return 0;  // creation and exit are the lifecycle probes' job
    u64 gp = ctx->ax;
    struct gkey key = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = read_u64(gp + OFF_G_GOID)};
    struct gstate *st = goroutines.lookup(&key);
    if (!st)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u64 spent = now - st->last_ns;
    st->state_ns[state_index(st->status)] += spent;
    if (st->status == G_RUNNABLE && state_index(to) == G_RUNNING) {
        u32 bucket = log2_bucket(spent), sum_slot = SCHED_BUCKETS;
        u64 *n = sched_latency.lookup(&bucket), *sum = sched_latency.lookup(&sum_slot);
        if (n)
            (*n)++;
        if (sum)
            *sum += spent;
    }
    st->last_ns = now;
    st->status = state_index(to);
    st->transitions++;
    u8 reason = 0;
    if (st->status == G_WAITING)  // gopark stored the reason in gp.waitreason before this call
        bpf_probe_read_user(&reason, 1, (void *)(gp + OFF_G_WAITREASON));
    st->waitreason = reason;
    if (st->events_sent >= MAX_EVENTS && state_index(to) != G_LEAKED) {  // a leak is always reported
        st->events_left_out++;
        return 0;
    }
    struct transition_event *ev = events.ringbuf_reserve(sizeof(struct transition_event));
    if (!ev) {
        st->events_left_out++;
        count(C_EVENTS_LOST);
        return 0;
    }
    ev->kind = EV_TRANSITION;
    ev->tgid = key.tgid;
    ev->goid = key.goid;
    ev->ts = now;
    ev->from = from;
    ev->to = to;
    ev->waitreason = reason;
    ev->pad = 0;
    events.ringbuf_submit(ev, 0);
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
    events.ringbuf_submit(ev, 0);
    return 0;
}

// --- heap allocations (--allocs; the estimate math is explained in otel_goroutines/allocs.py) ---
#if defined(ALLOCS_EXACT) || defined(ALLOCS_SAMPLED)
#define ALLOC_COUNT_UNIT (1ULL << ALLOC_COUNT_SHIFT)
// Allocations no goroutine span holds: made on a system stack (g0, gsignal: goid 0), or by a
// goroutine that is not in the map (it predates the probes, or the map was full).
enum alloc_owner { ALLOC_SYSTEM_STACK = 0, ALLOC_UNTRACKED = 1, N_ALLOC_OWNERS = 2 };
struct alloc_totals {
    u64 bytes;
    u64 count;    // in 1/ALLOC_COUNT_UNIT
    u64 samples;
};
BPF_PERCPU_ARRAY(allocs_elsewhere, struct alloc_totals, N_ALLOC_OWNERS);

// Adds to the totals of the goroutine running now: R14 is the current g in Go's register ABI.
// A goroutine runs on one thread at a time, so its own totals need no atomics.
static __always_inline void add_alloc(struct pt_regs *ctx, u64 bytes, u64 allocs, u64 samples) {
    u64 goid = read_u64(ctx->r14 + OFF_G_GOID);
    struct gkey key = {.tgid = bpf_get_current_pid_tgid() >> 32, .goid = goid};
    struct gstate *st = goid ? goroutines.lookup(&key) : NULL;
    if (st) {
        st->alloc_bytes += bytes;
        st->alloc_count += allocs;
        st->alloc_samples += samples;
        return;
    }
    u32 owner = goid ? ALLOC_UNTRACKED : ALLOC_SYSTEM_STACK;
    struct alloc_totals *t = allocs_elsewhere.lookup(&owner);
    if (t) {
        t->bytes += bytes;
        t->count += allocs;
        t->samples += samples;
    }
}
#endif

#ifdef ALLOCS_EXACT
// mallocgc(size, typ, needzero) after its stack check: RAX = the requested size.
int on_mallocgc(struct pt_regs *ctx) {
    u64 size = ctx->ax;
    // 0: no allocation (zerobase); up to SPECIALIZED_MALLOC_MAX: mallocgc passes it on to a
    // size-specialized entry, whose own probe counts it.
    if (size <= SPECIALIZED_MALLOC_MAX)
        return 0;
    add_alloc(ctx, size, ALLOC_COUNT_UNIT, 0);
    return 0;
}

// mallocgcSmallNoScanSC<n> and the like (same arguments), called by mallocgc and by compiled code.
int on_malloc_specialized(struct pt_regs *ctx) {
    add_alloc(ctx, ctx->ax, ALLOC_COUNT_UNIT, 0);
    return 0;
}
#endif

#ifdef ALLOCS_SAMPLED
// h(x) = 1/(1-exp(-x)) - 1/x at x = (i + 1/2) / ALLOC_WEIGHT_STEPS, in 1/ALLOC_COUNT_UNIT; filled by user space.
BPF_ARRAY(alloc_weights, u32, ALLOC_WEIGHT_ENTRIES);

// profilealloc(mp, x, size) after its stack check: RCX = the size of the sampled allocation.
// A sample of size s at rate r stands for 1/p allocations and s/p bytes, p = 1 - exp(-s/r).
int on_profilealloc(struct pt_regs *ctx) {
    u64 size = ctx->cx;
#ifdef MEMPROFILERATE_ADDR
    // runtime.MemProfileRate, at its link-time address moved by the load bias of a PIE.
    u64 rate = read_u64(MEMPROFILERATE_ADDR + PT_REGS_IP(ctx) - PROFILEALLOC_PROBE_ADDR);
#else
    u64 rate = DEFAULT_MEMPROFILERATE;
#endif
    if (!size)
        return 0;
    if ((s64)rate <= 1) {  // every allocation is sampled (or the rate is unknown): no scaling, as pprof
        add_alloc(ctx, size, ALLOC_COUNT_UNIT, 1);
        return 0;
    }
    if (rate > ALLOC_RATE_CAP)  // runtime.fastexprand caps the mean at this
        rate = ALLOC_RATE_CAP;
    u64 index = size * ALLOC_WEIGHT_STEPS / rate;
    if (index >= ALLOC_WEIGHT_ENTRIES) {  // s >= 16 r: sampled for sure (to 1e-7)
        add_alloc(ctx, size, ALLOC_COUNT_UNIT, 1);
        return 0;
    }
    u32 i = index;
    u32 *hq = alloc_weights.lookup(&i);
    if (!hq)
        return 0;
    add_alloc(ctx, rate + ((size * *hq) >> ALLOC_COUNT_SHIFT), (rate << ALLOC_COUNT_SHIFT) / size + *hq, 1);
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
    events.ringbuf_submit(ev, 0);
    return 0;
}
#endif
