// execer: a Go program that runs for DELAY (a goroutine ticking meanwhile), then replaces
// itself with PROGRAM (execve: same PID, another executable), as a Go launcher or a
// self-updating service does. Usage: execer DELAY PROGRAM [ARGS...]
package main

import (
	"os"
	"syscall"
	"time"
)

func spin() {
	for {
		time.Sleep(time.Millisecond)
	}
}

func main() {
	delay, err := time.ParseDuration(os.Args[1])
	if err != nil {
		panic(err)
	}
	go spin()
	time.Sleep(delay)
	if err := syscall.Exec(os.Args[2], os.Args[2:], os.Environ()); err != nil {
		panic(err)
	}
}
