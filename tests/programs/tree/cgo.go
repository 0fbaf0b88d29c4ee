//go:build cgo

package main

// With CGO_ENABLED=1 the tree links the C runtime, as every cgo program does (the matrix's cgo cells).
import _ "runtime/cgo"
