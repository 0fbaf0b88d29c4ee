// appbench: what following application spans and reading pprof labels cost a program, for
// scripts/measure_app_traces.py. Prints nanoseconds per operation.
//
//	appbench spans N              start and end N SDK spans (sampled and recorded, no exporter)
//	appbench goroutines N         create and join N goroutines, no span active, no labels
//	appbench goroutines-span N    ...while an SDK span is active on the creator
//	appbench goroutines-labels N  ...with two pprof labels, which they inherit
package main

import (
	"context"
	"fmt"
	"os"
	"runtime/pprof"
	"strconv"
	"sync"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
)

func spawn(n int) {
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() { wg.Done() }()
		if i%64 == 63 {
			wg.Wait()
		}
	}
	wg.Wait()
}

func main() {
	n, _ := strconv.Atoi(os.Args[2])
	tracer := sdktrace.NewTracerProvider().Tracer("appbench")
	ctx := context.Background()
	start := time.Now()
	switch os.Args[1] {
	case "spans":
		for i := 0; i < n; i++ {
			_, span := tracer.Start(ctx, "op")
			span.End()
		}
	case "goroutines":
		spawn(n)
	case "goroutines-span":
		_, span := tracer.Start(ctx, "parent")
		spawn(n)
		span.End()
	case "goroutines-labels":
		pprof.Do(ctx, pprof.Labels("span_id", "00f067aa0ba902b7", "span_name", "GET /work"), func(context.Context) { spawn(n) })
	}
	fmt.Println(float64(time.Since(start).Nanoseconds()) / float64(n))
}
