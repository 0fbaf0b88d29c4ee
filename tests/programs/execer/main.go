// execer: a Go program that runs for DELAY or until SIGUSR1 (a goroutine ticking meanwhile),
// then replaces itself with PROGRAM (execve: same PID, another executable), as a Go launcher or
// a self-updating service does. Usage: execer DELAY PROGRAM [ARGS...]
package main

import (
	"os"
	"os/signal"
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
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go spin()
	select {
	case <-time.After(delay):
	case <-usr1:
	}
	signal.Reset(syscall.SIGUSR1)
	if err := syscall.Exec(os.Args[2], os.Args[2:], os.Environ()); err != nil {
		panic(err)
	}
}
