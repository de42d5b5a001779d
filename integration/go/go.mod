module tracer.invalid/integration

go 1.17
