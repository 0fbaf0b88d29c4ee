module example.com/otel-goroutines-demo

go 1.21
