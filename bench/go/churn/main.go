// churn spawns and finishes N short goroutines and reports what one cost, measured by itself.
//
//	churn -n 200000 [-batch 1000] [-warmup 20000] [-trace FILE] [-hold]
//
// Goroutines are spawned in batches (the spawner waits for each batch), so no more than -batch
// are alive at once. -hold waits for a line on stdin before starting (for `attach`), -trace
// turns Go's own runtime/trace on for the measured part. Prints one JSON line.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime/trace"
	"sync"
	"time"
)

var sink [64]uint64

func churn(n, batch int) {
	var wg sync.WaitGroup
	for done := 0; done < n; {
		b := batch
		if n-done < b {
			b = n - done
		}
		wg.Add(b)
		for i := 0; i < b; i++ {
			go func(i int) {
				sink[i&63]++ // a short goroutine: a little work, then exit
				wg.Done()
			}(i)
		}
		wg.Wait()
		done += b
	}
}

func main() {
	n := flag.Int("n", 200000, "goroutines to spawn and finish in the measured part")
	batch := flag.Int("batch", 1000, "goroutines alive at most at once")
	warmup := flag.Int("warmup", 20000, "goroutines spawned before the measured part")
	traceFile := flag.String("trace", "", "write a runtime/trace of the measured part to FILE")
	hold := flag.Bool("hold", false, "wait for a line on stdin before starting")
	flag.Parse()

	if *hold {
		bufio.NewReader(os.Stdin).ReadString('\n')
	}
	churn(*warmup, *batch)
	if *traceFile != "" {
		f, err := os.Create(*traceFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		w := bufio.NewWriterSize(f, 1<<20)
		if err := trace.Start(w); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		defer func() { trace.Stop(); w.Flush(); f.Close() }()
	}
	start := time.Now()
	churn(*n, *batch)
	elapsed := time.Since(start)
	out, _ := json.Marshal(map[string]any{
		"n":                *n,
		"warmup":           *warmup,
		"elapsed_ns":       elapsed.Nanoseconds(),
		"ns_per_goroutine": float64(elapsed.Nanoseconds()) / float64(*n),
	})
	fmt.Println(string(out))
}
