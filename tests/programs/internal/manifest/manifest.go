// Package manifest lets a fixture program write down, from the inside, what its goroutines
// did, so tests can compare the agent's spans with the truth.
package manifest

import (
	"encoding/json"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Goroutine is one goroutine as the program saw it: wall-clock times in Unix nanoseconds.
type Goroutine struct {
	Goid      int64  `json:"goid"`
	Parent    int64  `json:"parent"`
	Func      string `json:"func"`
	Site      string `json:"site"`    // marker of the go statement that created it
	Spawned   int64  `json:"spawned"` // just before the go statement ran
	Started   int64  `json:"started"` // first statement of the goroutine
	Ended     int64  `json:"ended"`   // last statement (0: never ended)
	Joined    int64  `json:"joined"`  // when the parent saw it finish (0: never)
	WaitsOn   string `json:"waits_on,omitempty"`
}

var (
	mu   sync.Mutex
	list []*Goroutine
)

// Goid parses the current goroutine's id from its stack header ("goroutine 7 [running]:").
func Goid() int64 {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	fields := strings.Fields(string(buf))
	id, _ := strconv.ParseInt(fields[1], 10, 64)
	return id
}

func Now() int64 { return time.Now().UnixNano() }

// Add registers a goroutine record and returns it for the goroutine to fill in.
func Add(g *Goroutine) *Goroutine {
	mu.Lock()
	list = append(list, g)
	mu.Unlock()
	return g
}

// Set updates a record under the lock.
func Set(f func()) {
	mu.Lock()
	f()
	mu.Unlock()
}

// Write saves every record to path as JSON.
func Write(path string, extra map[string]any) {
	mu.Lock()
	defer mu.Unlock()
	out := map[string]any{"goroutines": list, "main_goid": Goid()}
	for k, v := range extra {
		out[k] = v
	}
	data, _ := json.MarshalIndent(out, "", " ")
	if err := os.WriteFile(path, data, 0o644); err != nil {
		panic(err)
	}
}
