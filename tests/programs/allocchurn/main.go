// allocchurn: short goroutines that each make a few dozen heap allocations of mixed sizes (a
// request handler's worth), to measure what --allocs costs the target. It reports, measured by
// itself, one JSON line: wall time and CPU time (user + system, which includes the kernel's
// uprobe handling; steadier than wall time on a busy machine) per goroutine and per allocation.
//
//	allocchurn [-n 20000] [-allocs 50] [-batch 100] [-warmup 2000] [-settle 1s]
//
// Nothing in it reads heap profiles, so the Go linker turns heap sampling off, as in most programs.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"sync"
	"syscall"
	"time"
)

var sizes = [...]int{16, 32, 48, 64, 96, 128, 256, 1024}

var sink [64][]byte

func handler(slot, allocs int, wg *sync.WaitGroup) {
	for i := 0; i < allocs; i++ {
		b := make([]byte, sizes[i%len(sizes)])
		b[0] = byte(i)
		sink[slot&63] = b
	}
	wg.Done()
}

func churn(n, allocs, batch int) {
	var wg sync.WaitGroup
	for done := 0; done < n; {
		b := batch
		if n-done < b {
			b = n - done
		}
		wg.Add(b)
		for i := 0; i < b; i++ {
			go handler(done+i, allocs, &wg)
		}
		wg.Wait()
		done += b
	}
}

func main() {
	n := flag.Int("n", 20000, "goroutines in the measured part")
	allocs := flag.Int("allocs", 50, "heap allocations per goroutine")
	batch := flag.Int("batch", 100, "goroutines alive at most at once")
	warmup := flag.Int("warmup", 2000, "goroutines before the measured part")
	settle := flag.Duration("settle", time.Second, "pause before the measured part (a tracer's start-up work is over)")
	flag.Parse()

	churn(*warmup, *allocs, *batch)
	time.Sleep(*settle)
	cpu0, start := cpuNanos(), time.Now()
	churn(*n, *allocs, *batch)
	elapsed, cpu := time.Since(start).Nanoseconds(), cpuNanos()-cpu0
	var bytes int
	for i := 0; i < *allocs; i++ {
		bytes += sizes[i%len(sizes)]
	}
	out, _ := json.Marshal(map[string]any{
		"n": *n, "allocs": *n * *allocs, "bytes": *n * bytes, "elapsed_ns": elapsed,
		"ns_per_goroutine": float64(elapsed) / float64(*n),
		"ns_per_alloc":     float64(elapsed) / float64(*n**allocs),
		"cpu_ns":           cpu, "cpu_ns_per_alloc": float64(cpu) / float64(*n**allocs),
	})
	fmt.Println(string(out))
}

// cpuNanos is the process's user + system CPU time so far.
func cpuNanos() int64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return ru.Utime.Nano() + ru.Stime.Nano()
}
