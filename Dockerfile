# syntax=docker/dockerfile:1
#
#   docker build -t spotify-token-swap --build-arg VERSION=$(git describe --tags --always) .
#   docker run --rm -p 127.0.0.1:8080:8080 --env-file .env --stop-timeout 30 spotify-token-swap

FROM golang:1.26.8-bookworm AS build
WORKDIR /src
# Modules first: this layer is rebuilt only when go.mod or go.sum change.
COPY go.mod go.sum ./
RUN go mod download
COPY *.go ./
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o spotify-token-swap .

# Static binary, CA certificates for accounts.spotify.com, no shell, user 65532.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/spotify-token-swap /spotify-token-swap
USER nonroot:nonroot
ENV PORT=8080
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=5s --retries=3 CMD ["/spotify-token-swap", "-healthcheck"]
ENTRYPOINT ["/spotify-token-swap"]
