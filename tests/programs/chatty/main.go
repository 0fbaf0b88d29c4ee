// chatty: writes a numbered line to stdout every 100 ms, from a goroutine it starts for each,
// while the agent's status line is on the same terminal. Usage: chatty LINES
package main

import (
	"fmt"
	"os"
	"strconv"
	"time"
)

func say(n int, done chan<- struct{}) {
	fmt.Printf("chatty line %d of the program\n", n)
	done <- struct{}{}
}

func main() {
	lines, _ := strconv.Atoi(os.Args[1])
	done := make(chan struct{})
	for n := 1; n <= lines; n++ {
		go say(n, done)
		<-done
		time.Sleep(100 * time.Millisecond)
	}
}
