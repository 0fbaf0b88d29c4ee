// loadgen drives a server on the loopback interface with a closed loop of keep-alive
// connections for a bounded time and request count, and reports throughput and latency.
//
//	loadgen -url http://127.0.0.1:PORT/work -c 16 -d 5s [-warmup 1s] [-max 2000000]
//
// It refuses any host that is not a loopback address. Prints one JSON line.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

func main() {
	target := flag.String("url", "", "URL to GET (loopback only)")
	conc := flag.Int("c", 16, "concurrent connections")
	dur := flag.Duration("d", 5*time.Second, "measured duration")
	warmup := flag.Duration("warmup", time.Second, "unmeasured warm-up before it")
	max := flag.Int64("max", 2_000_000, "stop after this many requests in all")
	flag.Parse()

	u, err := url.Parse(*target)
	if err != nil || u.Hostname() == "" {
		fmt.Fprintln(os.Stderr, "loadgen: -url http://127.0.0.1:PORT/... is required")
		os.Exit(2)
	}
	if ip := net.ParseIP(u.Hostname()); u.Hostname() != "localhost" && (ip == nil || !ip.IsLoopback()) {
		fmt.Fprintln(os.Stderr, "loadgen: refusing a non-loopback target", u.Hostname())
		os.Exit(2)
	}
	client := &http.Client{
		Transport: &http.Transport{MaxIdleConns: *conc, MaxIdleConnsPerHost: *conc, DisableCompression: true},
		Timeout:   10 * time.Second,
	}
	var sent, errors atomic.Int64
	var measuring atomic.Bool
	var stopping atomic.Bool
	lat := make([][]int64, *conc)
	var wg sync.WaitGroup
	for w := 0; w < *conc; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for !stopping.Load() && sent.Add(1) <= *max {
				t0 := time.Now()
				resp, err := client.Get(*target)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if !measuring.Load() {
					continue
				}
				if err != nil {
					errors.Add(1)
					continue
				}
				lat[w] = append(lat[w], time.Since(t0).Nanoseconds())
			}
		}(w)
	}
	time.Sleep(*warmup)
	measuring.Store(true)
	start := time.Now()
	time.Sleep(*dur)
	measuring.Store(false)
	elapsed := time.Since(start)
	stopping.Store(true)
	wg.Wait()

	var all []int64
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))]) / 1e3
	}
	out, _ := json.Marshal(map[string]any{
		"requests": len(all),
		"errors":   errors.Load(),
		"seconds":  elapsed.Seconds(),
		"rps":      float64(len(all)) / elapsed.Seconds(),
		"p50_us":   pct(0.50),
		"p99_us":   pct(0.99),
	})
	fmt.Println(string(out))
}
