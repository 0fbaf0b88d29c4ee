// appservice: a net/http service instrumented with the OpenTelemetry Go SDK, exporting its own
// spans over OTLP/HTTP (OTEL_EXPORTER_OTLP_ENDPOINT), for the tests of goroutine spans inside
// the application's traces. Its go.mod pins the newest SDK; go.sdk-*.mod files pin older ones.
//
//	GET /work?id=N  server span S (from the request's traceparent, if any). The handler starts:
//	                3 main.fetch (under S), each starting its own span F and, under F, a main.parse;
//	                main.query under a nested span D (db.query) of the handler;
//	                inside pprof.Do(request.id=N), after D ended: main.audit under S, which starts
//	                main.sub with no span of its own (both inherit the label), and main.labelled
//	                under S, which adds a label of its own (stage=labelled).
//	main.warmup     started in main under a "startup" span, which ends before anything else starts
//	main.janitor    started in main with no span active; starts a main.tick every 20 ms
//
// Every goroutine notes its id and what its span's parent should be. On SIGTERM the service shuts
// its tracer provider down (flushing its spans) and writes that to MANIFEST.
// Usage: appservice READY_FILE MANIFEST
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// Goroutine is one goroutine the service started, and the span its goroutine span should have as parent:
// "span:<hex span id>" (an application span) or "goroutine:<goid>" (its creator's goroutine span).
type Goroutine struct {
	Goid   int64  `json:"goid"`
	Func   string `json:"func"`
	Parent string `json:"parent"`
}

// Request is one /work request as the handler saw it.
type Request struct {
	TraceID    string      `json:"trace_id"`
	ServerSpan string      `json:"server_span"`
	Sampled    bool        `json:"sampled"`
	Handler    int64       `json:"handler_goid"`
	Goroutines []Goroutine `json:"goroutines"`
}

var (
	tracer   trace.Tracer
	mu       sync.Mutex
	requests = map[string]*Request{}
	startup  []Goroutine
	ticks    []int64
)

func goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	id, _ := strconv.ParseInt(strings.Fields(string(buf))[1], 10, 64)
	return id
}

func spanParent(ctx context.Context) string {
	return "span:" + trace.SpanFromContext(ctx).SpanContext().SpanID().String()
}

func note(id string, fn, parent string) {
	mu.Lock()
	defer mu.Unlock()
	r := requests[id]
	r.Goroutines = append(r.Goroutines, Goroutine{goid(), fn, parent})
}

func parse(id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.parse", parent)
	time.Sleep(2 * time.Millisecond)
}

func fetch(ctx context.Context, id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.fetch", parent)
	ctx, span := tracer.Start(ctx, "fetch")
	var inner sync.WaitGroup
	inner.Add(1)
	go parse(id, spanParent(ctx), &inner)
	inner.Wait()
	span.End()
}

func query(id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.query", parent)
	time.Sleep(time.Millisecond)
}

func sub(id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.sub", parent)
}

func audit(id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.audit", parent)
	wg.Add(1)
	go sub(id, fmt.Sprintf("goroutine:%d", goid()), wg)
}

func labelled(ctx context.Context, id, parent string, wg *sync.WaitGroup) {
	defer wg.Done()
	note(id, "main.labelled", parent)
	// A label of its own, on top of the request.id it inherited from the handler's pprof.Do.
	pprof.SetGoroutineLabels(pprof.WithLabels(ctx, pprof.Labels("stage", "labelled")))
	time.Sleep(time.Millisecond)
}

func work(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	id := r.URL.Query().Get("id")
	sc := trace.SpanContextFromContext(ctx)
	mu.Lock()
	requests[id] = &Request{TraceID: sc.TraceID().String(), ServerSpan: sc.SpanID().String(), Sampled: sc.IsSampled(), Handler: goid()}
	mu.Unlock()
	server := spanParent(ctx)
	var wg sync.WaitGroup
	for i := 0; i < 3; i++ {
		wg.Add(1)
		go fetch(ctx, id, server, &wg)
	}
	dctx, db := tracer.Start(ctx, "db.query")
	wg.Add(1)
	go query(id, spanParent(dctx), &wg)
	time.Sleep(time.Millisecond)
	db.End()
	pprof.Do(ctx, pprof.Labels("request.id", id), func(lctx context.Context) {
		wg.Add(2)
		go audit(id, server, &wg)
		go labelled(lctx, id, server, &wg)
	})
	wg.Wait()
	fmt.Fprintln(w, "ok")
}

// serverSpan is what an HTTP instrumentation does: a server span, child of the caller's traceparent.
func serverSpan(name string, h http.HandlerFunc) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := otel.GetTextMapPropagator().Extract(r.Context(), propagation.HeaderCarrier(r.Header))
		ctx, span := tracer.Start(ctx, name, trace.WithSpanKind(trace.SpanKindServer))
		defer span.End()
		h(w, r.WithContext(ctx))
	})
}

func warmup(parent string, done chan<- struct{}) {
	mu.Lock()
	startup = append(startup, Goroutine{goid(), "main.warmup", parent})
	mu.Unlock()
	close(done)
}

func tick() {
	mu.Lock()
	ticks = append(ticks, goid())
	mu.Unlock()
}

func janitor() {
	for {
		time.Sleep(20 * time.Millisecond)
		go tick()
	}
}

func main() {
	exporter, err := otlptracehttp.New(context.Background())
	if err != nil {
		panic(err)
	}
	provider := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exporter, sdktrace.WithBatchTimeout(100*time.Millisecond)))
	otel.SetTracerProvider(provider)
	otel.SetTextMapPropagator(propagation.TraceContext{})
	tracer = otel.Tracer("appservice")

	ctx, span := tracer.Start(context.Background(), "startup")
	done := make(chan struct{})
	go warmup(spanParent(ctx), done)
	<-done
	span.End()
	go janitor()

	http.Handle("/work", serverSpan("GET /work", work))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		panic(err)
	}
	go http.Serve(ln, nil)
	os.WriteFile(os.Args[1], []byte(strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)), 0o644)

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	<-sigs
	shutdown, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := provider.Shutdown(shutdown); err != nil {
		fmt.Fprintln(os.Stderr, "shutdown:", err)
	}
	mu.Lock()
	defer mu.Unlock()
	data, _ := json.MarshalIndent(map[string]any{"requests": requests, "startup": startup, "ticks": ticks}, "", " ")
	if err := os.WriteFile(os.Args[2], data, 0o644); err != nil {
		panic(err)
	}
}
