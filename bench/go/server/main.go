// server is a small net/http service whose handler fans out to goroutines that allocate:
// what a traced production service looks like to the agent.
//
//	server -addr 127.0.0.1:0 -ready FILE [-fanout 4] [-alloc 16384] [-trace FILE]
//
// Once listening it writes "PORT PID" to the -ready file. SIGINT/SIGTERM stop it cleanly (exit 0).
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"hash/crc32"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime/trace"
	"strconv"
	"syscall"
	"time"
)

type result struct {
	Part  int    `json:"part"`
	Bytes int    `json:"bytes"`
	CRC   uint32 `json:"crc"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address (loopback)")
	ready := flag.String("ready", "", "file to write \"PORT PID\" to once listening")
	fanout := flag.Int("fanout", 4, "goroutines spawned per request")
	alloc := flag.Int("alloc", 16384, "bytes each of them allocates")
	traceFile := flag.String("trace", "", "write a runtime/trace to FILE while serving")
	flag.Parse()

	mux := http.NewServeMux()
	mux.HandleFunc("/work", func(w http.ResponseWriter, r *http.Request) {
		size := *alloc
		if s := r.URL.Query().Get("alloc"); s != "" {
			size, _ = strconv.Atoi(s)
		}
		results := make(chan result, *fanout)
		for part := 0; part < *fanout; part++ {
			go func(part int) {
				buf := make([]byte, size)
				for i := range buf {
					buf[i] = byte(i*31 + part)
				}
				results <- result{part, len(buf), crc32.ChecksumIEEE(buf)}
			}(part)
		}
		parts := make([]result, 0, *fanout)
		for i := 0; i < *fanout; i++ {
			parts = append(parts, <-results)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(parts)
	})
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if *traceFile != "" {
		f, err := os.Create(*traceFile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		w := bufio.NewWriterSize(f, 1<<20)
		trace.Start(w)
		defer func() { trace.Stop(); w.Flush(); f.Close() }()
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	if *ready != "" {
		port := ln.Addr().(*net.TCPAddr).Port
		tmp := *ready + ".tmp"
		os.WriteFile(tmp, []byte(fmt.Sprintf("%d %d\n", port, os.Getpid())), 0o644)
		os.Rename(tmp, *ready)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	<-stop
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(ctx)
}
