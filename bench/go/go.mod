module otelgoroutines/bench

go 1.21
