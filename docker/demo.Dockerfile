# The demo Go service of docker/compose.yaml: demo/ built as a static binary, run with -serve
# (a burst of 20 requests every second until SIGTERM), as an unprivileged user.
ARG GO_IMAGE=golang:1.26-bookworm
FROM ${GO_IMAGE} AS build
WORKDIR /src
COPY demo/ ./
RUN CGO_ENABLED=0 GOFLAGS=-mod=mod go build -trimpath -o /demo .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /demo /demo
ENTRYPOINT ["/demo", "-serve"]
