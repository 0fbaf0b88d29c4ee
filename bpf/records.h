// What the kernel side tells user space: map keys and values, ring-buffer records, counters.
// The one definition of these layouts. otel_goroutines/kernel_records.py is generated from this
// file by scripts/gen_records.py (numpy dtypes, enums, counter names), and
// tests/unit/test_kernel_records.py fails when the two drift or when gcc lays a struct out
// differently from the generated dtype. Keep to the generator's subset: enums with explicit
// values, `#define NAME number`, structs of u8/u16/u32/u64 fields, arrays of them or of
// structs defined above; no padding the compiler would add (pad fields are explicit).
#ifndef OTEL_GOROUTINES_RECORDS_H
#define OTEL_GOROUTINES_RECORDS_H

#define N_STATES 12       // runtime goroutine status values 0..11 (_Gidle .. _Gdeadextra)
#define MAX_LABELS 8      // runtime/pprof labels sent per goroutine
#define LABEL_KEY_MAX 32
#define LABEL_VALUE_MAX 64
#define SCHED_BUCKETS 40  // log2(ns) buckets of the time runnable before running (go.schedule.duration)

// Ring-buffer record kinds: the first u32 of every record.
enum event_kind {
    EV_TRANSITION = 1,
    EV_END = 2,
    EV_PROCESS_EXIT = 3,
    EV_RUNTIME_INITIALISED = 4,
    EV_LABELS = 5,
};

// Why a goroutine starts a trace of its own instead of joining its creator's.
enum trace_reason {
    TR_JOINS_PARENT = 0,
    TR_UNTRACED_PARENT = 1,  // the creator has no span (it predates the probes)
    TR_SPAWNER = 2,          // the creator is a long-lived or prolific spawner
    TR_TRACE_FULL = 3,       // the creator's trace reached its span cap
    TR_APP_SPAN = 4,         // created under an application span: in that trace, its child
    TR_GROUPED = 5,          // never set here: user space (flow.py) puts a spawner's short childless children in groups
    TR_NO_PARENT = 6,        // created by no goroutine (runtime.main): set by user space (flow.py), not here
};

// gstate.flags
enum gstate_flag {
    FLAG_EXISTED_AT_ATTACH = 1,
    FLAG_WOKE_OTHERS = 2,  // it woke goroutines, whose spans may link to it: flow.py never regroups its span
};

// gstate.app_flags
enum app_flag {
    APP_IN_TRACE = 1,  // in the application's trace app_trace_id
    APP_LINKED = 2,    // starts a trace of its own, linked to its creator's place in app_trace_id
    APP_SAMPLED = 4,   // the application sampled that trace
};

// transition_event.waker: who made a waiting goroutine runnable (a wake: waiting -> runnable).
enum waker_flag {
    WAKER_GOROUTINE = 1,  // a goroutine was running on the waking thread (m.curg): waker_goid
    WAKER_TRACED = 2,     // ...and it has a span, in the trace of waker_root
    WAKER_APP_TRACE = 4,  // ...in an application's trace (its trace id is not sent: no link)
};

// Per-CPU counters of what could not be delivered (and goroutines created, for the live count).
enum counter {
    C_MAP_FULL = 0,        // goroutine not tracked: the map was full (its span is lost, counted)
    C_EVENTS_LOST = 1,     // transition events the ring buffer had no room for
    C_END_DEFERRED = 2,    // end records left in the map for user space to collect (ring buffer full)
    C_UNTRACKED_EXIT = 3,  // exits of goroutines created before the probes were attached
    C_READ_ERROR = 4,      // target memory that could not be read
    C_CREATED = 5,         // goroutines created (not a loss; for the live count)
    C_HITS_CREATE = 6,     // runs of each lifecycle and state handler in this process: the overhead
    C_HITS_EXIT = 7,       //   budget's hit counts (counted only in a program built with FEATURE_BUDGET;
    C_HITS_STATE = 8,      //   the kernel's own run counts add up every process sharing the program)
    C_HITS_OTHER = 9,      // runs of the allocation and application-span handlers (counted by the budget, not shed)
    N_COUNTERS = 10,
};

enum app_counter {
    AC_SPANS_STARTED = 0,       // application spans seen starting
    AC_SPANS_ENDED = 1,         // ...and ending (on any goroutine)
    AC_SPANS_DROPPED_DEEP = 2,  // oldest active span forgotten: too many active on one goroutine
    AC_STACKS_FULL = 3,         // span not followed: the per-goroutine map was full
    AC_UNKNOWN_SPAN_TYPE = 4,   // Start returned neither a *recordingSpan nor a nonRecordingSpan
    AC_GOROUTINES_JOINED = 5,   // goroutines created under an application span
    AC_LABELS_SENT = 6,         // ended goroutines whose pprof labels were sent
    AC_LABELS_LOST = 7,         // ...not sent: the ring buffer was full
    N_APP_COUNTERS = 8,
};

// proc_config.flags: what a traced process's binary has, and how its probes read it.
enum proc_flag {
    CFG_STATES_COVER_LIFECYCLE = 1,  // the casgstatus probe also sees creations and exits (Go 1.24+)
    CFG_PARENT_GOID = 2,             // g.parentGoid exists (Go 1.21+); else the creator is g0.m.curg
    CFG_APP_SPANS = 4,               // the application's OpenTelemetry SDK spans are followed
    CFG_LABELS_MAP = 8,              // g.labels points to a map[string]string (Go <= 1.23)
    CFG_LABELS_SLICE = 16,           // ...to a struct { []struct{key, value string} } (Go 1.24+)
    CFG_MEMPROFILERATE = 32,         // memprofilerate_addr is known
};

#define G_WINDOW 256  // the most bytes of a g read at once (a power of two); goruntime.py checks the offsets fit

// What the probes need to know about one traced process (its binary's layouts), in the
// `proc_configs` map keyed by tgid: one compiled program serves every process. Offsets named
// g_* are relative to g_start, where the one read of a g begins; off_* are absolute.
struct proc_config {
    u64 probe_ip;                 // written by the kernel: where the creation probe was first hit (a PIE's load bias)
    u64 memprofilerate_addr;      // link-time address of runtime.MemProfileRate (CFG_MEMPROFILERATE)
    u64 profilealloc_probe_addr;  // link-time address of the profilealloc probe: the two give the load bias
    u64 specialized_malloc_max;   // mallocgc leaves sizes 1..this to the size-specialized entries
    u32 slot;                     // this process's rows in the per-process counter arrays
    u32 flags;                    // enum proc_flag
    u32 g_start;                  // offset in g of the window read
    u32 g_lo_size;                // bytes read for a state change: status, goid, waitreason
    u32 g_all_size;               // bytes read for a creation: up to gopc, startpc, parentGoid
    u32 g_goid;
    u32 g_status;
    u32 g_waitreason;
    u32 g_gopc;
    u32 g_startpc;
    u32 g_parentgoid;
    u32 off_g_goid;
    u32 off_g_m;
    u32 off_m_curg;
    u32 off_g_labels;
    u32 off_rspan_sc;             // application spans (otel_goroutines/gosdk.py)
    u32 off_nrspan_sc;
    u32 off_sc_traceid;
    u32 off_sc_spanid;
    u32 off_sc_flags;
};

struct gkey {
    u32 tgid;
    u32 pad;
    u64 goid;
};

// One goroutine, from creation to exit: the `goroutines` map value, and the body of its end record.
struct gstate {
    u64 create_ns;
    u64 end_ns;            // 0 while the goroutine lives
    u64 last_ns;           // time of the last state change
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
    u64 root_goid;         // the goroutine whose trace this one is in (itself when it starts one)
    u64 parent_root_goid;  // the creator's trace, for the link when this one starts its own
    u32 children;          // goroutines it created
    u32 trace_reason;      // enum trace_reason
    u32 flags;             // enum gstate_flag
    u32 waitreason;        // of the current wait, when status is waiting
    u64 alloc_bytes;       // heap bytes it allocated (--allocs; sampled: an estimate)
    u64 alloc_count;       // heap allocations, in 1/ALLOC_COUNT_UNIT (sampled: an estimate)
    u64 alloc_samples;     // heap-profile samples the estimate rests on (sampled)
    u8 app_trace_id[16];   // the application's trace (OpenTelemetry SDK) it is in, or links to
    u8 app_span_id[8];     // its parent, the application span active on its creator; 0: its creator's span
    u32 app_flags;         // enum app_flag
    u32 app_pad;
};

// EV_TRANSITION (also EV_PROCESS_EXIT and EV_RUNTIME_INITIALISED, with goid 0).
struct transition_event {
    u32 kind;
    u32 tgid;
    u64 goid;
    u64 ts;
    u32 from;
    u32 to;
    u32 waitreason;  // to waiting: the wait's reason; a wake: the reason of the wait it ends
    u32 waker;       // a wake: enum waker_flag (0: no goroutine was running, the runtime woke it)
    u64 waker_goid;
    u64 waker_root;  // the waker's trace (its root goroutine), when WAKER_TRACED
    u64 wake_pc;     // a wake: where casgstatus was called from (runtime.ready, injectglist, ...)
    u64 waker_start_pc;  // the waker's start function, when WAKER_TRACED or WAKER_APP_TRACE (a runtime goroutine?)
};

// EV_END: a goroutine ended; its whole state.
struct end_event {
    u32 kind;
    u32 tgid;
    u64 goid;
    struct gstate st;
};

struct label {
    u16 key_len;    // the full lengths; the bytes kept are truncated to the buffers
    u16 value_len;
    u8 key[LABEL_KEY_MAX];
    u8 value[LABEL_VALUE_MAX];
};

// EV_LABELS: the runtime/pprof labels of a goroutine, sent just before its end record.
struct labels_event {
    u32 kind;
    u32 tgid;
    u64 goid;
    u32 count;      // labels sent
    u32 total;      // labels the goroutine had
    struct label labels[MAX_LABELS];
};

#endif
