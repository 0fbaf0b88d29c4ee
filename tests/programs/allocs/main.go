// allocs: goroutines that allocate known, different amounts on the heap: many small objects,
// large slices, strings, maps, a little, and next to nothing. They run one after another, so each
// also measures what the runtime counted meanwhile (runtime.ReadMemStats deltas).
// Usage: allocs MANIFEST [wait-sampling]
//
// wait-sampling: first wait (30 s at most) for runtime.MemProfileRate to be non-zero. The linker turns
// heap sampling off in a program that never reads a memory profile; `--allocs sampled` turns it back
// on once the runtime has initialised, a few milliseconds later, and allocations made before that
// are not sampled: the fixture's truth is only comparable once sampling is on.
//
// The manifest's "allocs" list has, per goroutine: bytes and count it requested by construction
// (0 where the program cannot know them: a map's internals), and heap_bytes / heap_count, the
// runtime's own counts over its run (heap bytes rounded up to size classes).
package main

import (
	"os"
	"runtime"
	"time"

	m "example.com/goroutine-fixtures/internal/manifest"
)

const (
	nNodes    = 1 << 20 // 64-byte objects with a pointer: 64 MiB
	nBlocks   = 1 << 18 // 512-byte objects without: 128 MiB
	nSlices   = 64      // 1 MiB slices: 64 MiB
	nStrings  = 28672   // 4 KiB strings: 112 MiB
	mapRounds = 20      // maps of 16384 1 KiB values: 320 MiB of values, plus the maps' own tables
	mapKeys   = 16384
	nModest   = 8192 // 256-byte slices: 2 MiB
)

type node struct {
	next *node
	vals [7]int64
}

// Sinks keep every allocation on the heap (escape analysis cannot prove they die young).
var (
	sinkNode  *node
	sinkBlock *[512]byte
	sinkBytes []byte
	sinkStr   string
	sinkMap   map[int64][1024]byte
	sinkSum   int64
)

type Alloc struct {
	Goid      int64  `json:"goid"`
	Func      string `json:"func"`
	Bytes     int64  `json:"bytes"`
	Count     int64  `json:"count"`
	HeapBytes int64  `json:"heap_bytes"`
	HeapCount int64  `json:"heap_count"`
}

// Each goroutine's start function names its span (not inlined into the go statement's wrapper).
//
//go:noinline
func smallObjects(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		for i := 0; i < nNodes; i++ {
			sinkNode = &node{next: sinkNode}
			sinkNode.next = nil
		}
		for i := 0; i < nBlocks; i++ {
			sinkBlock = new([512]byte)
		}
		return nNodes*64 + nBlocks*512, nNodes + nBlocks
	})
}

//go:noinline
func largeSlices(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		for i := 0; i < nSlices; i++ {
			sinkBytes = make([]byte, 1<<20)
		}
		return nSlices << 20, nSlices
	})
}

//go:noinline
func buildStrings(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		a, b := string(make([]byte, 2048)), string(make([]byte, 2048))
		for i := 0; i < nStrings; i++ {
			sinkStr = a + b
		}
		return nStrings*4096 + 2*2048, nStrings + 2
	})
}

//go:noinline
func fillMaps(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		var value [1024]byte
		for r := 0; r < mapRounds; r++ {
			mp := make(map[int64][1024]byte)
			for k := int64(0); k < mapKeys; k++ {
				value[0] = byte(k)
				mp[k] = value // values over 128 bytes are allocated one by one
			}
			sinkMap = mp
		}
		sinkMap = nil
		return 0, 0 // the maps' internals are the runtime's business: see heap_bytes
	})
}

//go:noinline
func modest(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		for i := 0; i < nModest; i++ {
			sinkBytes = make([]byte, 256)
		}
		return nModest * 256, nModest
	})
}

//go:noinline
func idle(rec *m.Goroutine, out *Alloc, done chan struct{}) {
	measure(rec, out, done, func() (int64, int64) {
		time.Sleep(20 * time.Millisecond)
		var sum int64
		for i := int64(0); i < 1000000; i++ {
			sum += i * i
		}
		sinkSum = sum
		return 0, 0
	})
}

// measure runs work between two ReadMemStats calls and notes both views of what it allocated.
func measure(rec *m.Goroutine, out *Alloc, done chan struct{}, work func() (int64, int64)) {
	goid := m.Goid()
	m.Set(func() { rec.Goid, rec.Started = goid, m.Now() })
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	bytes, count := work()
	runtime.ReadMemStats(&after)
	*out = Alloc{Goid: goid, Func: rec.Func, Bytes: bytes, Count: count,
		HeapBytes: int64(after.TotalAlloc - before.TotalAlloc), HeapCount: int64(after.Mallocs - before.Mallocs)}
	m.Set(func() { rec.Ended = m.Now() })
	close(done)
}

func main() {
	if len(os.Args) > 2 && os.Args[2] == "wait-sampling" {
		for deadline := time.Now().Add(30 * time.Second); runtime.MemProfileRate == 0 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
	}
	me := m.Goid()
	names := []string{"main.modest", "main.smallObjects", "main.largeSlices", "main.buildStrings", "main.fillMaps", "main.idle"}
	allocs := make([]*Alloc, len(names))
	for i, name := range names {
		rec := m.Add(&m.Goroutine{Parent: me, Func: name, Site: "worker", Spawned: m.Now()})
		out, done := &Alloc{}, make(chan struct{})
		allocs[i] = out
		switch i { // one after another: each one's MemStats deltas are its own
		case 0:
			go modest(rec, out, done)
		case 1:
			go smallObjects(rec, out, done)
		case 2:
			go largeSlices(rec, out, done)
		case 3:
			go buildStrings(rec, out, done)
		case 4:
			go fillMaps(rec, out, done)
		case 5:
			go idle(rec, out, done)
		}
		<-done
		now := m.Now()
		m.Set(func() { rec.Joined = now })
	}
	m.Write(os.Args[1], map[string]any{"allocs": allocs})
}
