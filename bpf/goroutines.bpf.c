// Goroutine lifecycle probes, loaded by otel_goroutines/probes.py with bcc.
//
// Per-goroutine state lives in the `goroutines` map from creation to exit; user space gets one
// end record per goroutine (with its totals) and, at the "states" detail, up to MAX_EVENTS
// state transitions per goroutine. Whatever cannot be delivered is counted in `counters`.
//
// Compile-time parameters (-D, from otel_goroutines/goruntime.py and probes.py):
//   OFF_G_GOID, OFF_G_GOPC, OFF_G_STARTPC, OFF_G_WAITREASON, OFF_G_ATOMICSTATUS, OFF_G_M,
//   OFF_M_CURG, optionally OFF_G_PARENTGOID; MAX_GOROUTINES, RINGBUF_PAGES, MAX_EVENTS.
#include <uapi/linux/ptrace.h>

#define N_STATES 12
#define G_DEAD 6
#define G_SCAN 0x1000

enum event_kind { EV_TRANSITION = 1, EV_END = 2, EV_PROCESS_EXIT = 3 };
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

static __always_inline u32 state_index(u32 status) {
    status &= ~G_SCAN;
    return status < N_STATES ? status : 0;
}

// At the RET of runtime.newproc1: RAX = the new g, complete.
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
    st.parent_traced = goroutines.lookup(&parent) != NULL;
    count(C_CREATED);
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
    st->state_ns[state_index(st->status)] += now - st->last_ns;
    st->last_ns = now;
    st->status = state_index(to);
    st->transitions++;
    if (st->events_sent >= MAX_EVENTS) {
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
    u8 reason = 0;
    if (state_index(to) == 4)  // _Gwaiting: gopark stored the reason in gp.waitreason before this call
        bpf_probe_read_user(&reason, 1, (void *)(gp + OFF_G_WAITREASON));
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
