// spandepth: one goroutine, main.deep, nests 10 OpenTelemetry SDK spans (s1 outermost, s10
// innermost) and starts a goroutine at three depths, to show what the agent keeps of more than 8
// spans active at once on one goroutine (it remembers the newest 8):
//
//	main.under10  started under s10
//	main.under3   started once s10..s4 have ended: under s3, the oldest span remembered
//	main.under2   started once s3 has ended too: s2 and s1 are still active, but forgotten
//
// It writes each span's id and each goroutine's id to MANIFEST. Usage: spandepth MANIFEST
package main

import (
	"context"
	"encoding/json"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

var (
	mu         sync.Mutex
	goroutines = map[string]int64{}
)

func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

func under(name string, wg *sync.WaitGroup) {
	defer wg.Done()
	mu.Lock()
	goroutines[name] = goid()
	mu.Unlock()
}

func deep(tracer trace.Tracer, out map[string]any) {
	ctx := context.Background()
	var spans []trace.Span
	var ids []string
	for i := 1; i <= 10; i++ {
		var span trace.Span
		ctx, span = tracer.Start(ctx, "s"+strconv.Itoa(i))
		spans, ids = append(spans, span), append(ids, span.SpanContext().SpanID().String())
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go under("main.under10", &wg) // site:under10
	wg.Wait()
	for i := 10; i >= 4; i-- {
		spans[i-1].End()
	}
	wg.Add(1)
	go under("main.under3", &wg) // site:under3
	wg.Wait()
	spans[2].End()
	wg.Add(1)
	go under("main.under2", &wg) // site:under2
	wg.Wait()
	spans[1].End()
	spans[0].End()
	out["span_ids"], out["trace_id"], out["deep_goid"] = ids, spans[0].SpanContext().TraceID().String(), goid()
}

func main() {
	provider := sdktrace.NewTracerProvider() // sampled, recording spans; exported nowhere
	out := map[string]any{}
	done := make(chan struct{})
	go func() { deep(provider.Tracer("spandepth"), out); close(done) }()
	<-done
	time.Sleep(20 * time.Millisecond) // the ends are recorded before the process exits
	out["goroutines"] = goroutines
	data, _ := json.MarshalIndent(out, "", " ")
	if err := os.WriteFile(os.Args[1], data, 0o644); err != nil {
		panic(err)
	}
}
