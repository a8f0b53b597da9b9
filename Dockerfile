# The regional backend. Build stage: a static binary with no cgo, so the
# final image needs no C library.
FROM golang:1.26-alpine AS build
WORKDIR /src
# Modules first: this layer is cached until go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY *.go ./
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /property-listing .

# Final stage: only the binary. It is its own healthcheck client
# ("property-listing healthcheck"), since the image has no shell or curl.
FROM scratch
COPY --from=build /property-listing /property-listing
# An unprivileged user; the service needs no privilege at all.
USER 65532:65532
EXPOSE 8000
ENTRYPOINT ["/property-listing"]
