module example.com/goroutine-fixtures

go 1.19
