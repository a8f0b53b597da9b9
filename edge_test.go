//go:build integration

package main

// The edge: what NGINX does for every client before a backend sees the
// request. Rate limits per client address, HTTPS with HTTP/2, and the
// headers every answer carries.

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"
)

// clientFrom returns an HTTP client whose connections come from the given
// local address: a loopback address other than 127.0.0.1 is a client NGINX
// rate-limits (nginx.conf).
func clientFrom(addr string) *http.Client {
	dialer := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(addr)}, Timeout: 5 * time.Second}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext:         dialer.DialContext,
		MaxIdleConnsPerHost: 64,
	}}
}

// TestRateLimit floods NGINX from one client address: past its burst, that
// client gets JSON 429s with Retry-After, while a client from another
// address is served as usual.
func TestRateLimit(t *testing.T) {
	s := newStack(t)
	flooder, other := clientFrom("127.0.0.2"), clientFrom("127.0.0.3")
	var (
		mu     sync.Mutex
		counts = map[int]int{}
		first  *http.Response
		body   []byte
		wg     sync.WaitGroup
	)
	for w := range 16 {
		wg.Go(func() {
			for range 40 {
				resp, err := flooder.Get(s.url + "/us/properties/1")
				if err != nil {
					t.Errorf("flooder %d: %v", w, err)
					return
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				mu.Lock()
				counts[resp.StatusCode]++
				if resp.StatusCode == http.StatusTooManyRequests && first == nil {
					first, body = resp, b
				}
				mu.Unlock()
			}
		})
	}
	// Meanwhile the other client is served.
	time.Sleep(50 * time.Millisecond)
	resp, err := other.Get(s.url + "/us/properties/1")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("another client during the flood: %v %v, want 200", resp, err)
	}
	if resp != nil {
		resp.Body.Close()
	}
	wg.Wait()
	t.Logf("640 requests from one address: statuses %v", counts)
	if counts[http.StatusTooManyRequests] == 0 || counts[http.StatusOK] == 0 || counts[http.StatusOK]+counts[http.StatusTooManyRequests] != 640 {
		t.Fatalf("statuses %v: want some 200s (the burst), then 429s, and nothing else", counts)
	}
	var got errorBody
	if err := json.Unmarshal(body, &got); err != nil || got.Error == "" || first.Header.Get("Retry-After") != "1" ||
		first.Header.Get("Content-Type") != "application/json" || first.Header.Get("X-Served-By") != "nginx" {
		t.Errorf("the 429: headers %v, body %q (%v); want JSON with Retry-After: 1 from nginx", first.Header, body, err)
	}
}

// tlsClient trusts the stack's certificate (STACK_TLS_CERT) and no other.
func tlsClient(t *testing.T, cfg *tls.Config) *http.Client {
	t.Helper()
	pem, err := os.ReadFile(setting("STACK_TLS_CERT", "tls/cert.pem"))
	if err != nil {
		t.Fatalf("the stack's certificate: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		t.Fatal("the stack's certificate is not PEM")
	}
	cfg.RootCAs = pool
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg, ForceAttemptHTTP2: true}}
}

// TestHTTPS speaks HTTPS to NGINX: HTTP/2 over TLS 1.2 or 1.3 with HSTS, a
// write included; a client that offers only TLS 1.1 is refused; HTTP stays
// as it was, without HSTS.
func TestHTTPS(t *testing.T) {
	s := newStack(t)
	base := setting("STACK_TLS_URL", "https://localhost:8443")
	client := tlsClient(t, &tls.Config{})
	resp, err := client.Get(base + "/eu/properties/2")
	if err != nil {
		t.Fatalf("GET over HTTPS: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.ProtoMajor != 2 || resp.TLS == nil || resp.TLS.Version < tls.VersionTLS12 ||
		resp.Header.Get("Strict-Transport-Security") == "" || resp.Header.Get("X-Served-By") != "eu" {
		t.Errorf("GET over HTTPS: %d %s, TLS %v, HSTS %q, served by %q; want 200 over HTTP/2, TLS ≥ 1.2, HSTS, from eu",
			resp.StatusCode, resp.Proto, resp.TLS != nil, resp.Header.Get("Strict-Transport-Security"), resp.Header.Get("X-Served-By"))
	}

	old := tlsClient(t, &tls.Config{MaxVersion: tls.VersionTLS11})
	if resp, err := old.Get(base + "/eu/health"); err == nil {
		resp.Body.Close()
		t.Errorf("a TLS 1.1 client was served (%s)", resp.Proto)
	}

	status, h, _, err := s.doWith("GET", "/eu/properties/2", http.Header{}, "")
	if err != nil || status != http.StatusOK || h.Get("Strict-Transport-Security") != "" {
		t.Errorf("GET over HTTP: %d, HSTS %q, %v; want 200 without HSTS", status, h.Get("Strict-Transport-Security"), err)
	}
}

// TestSecurityHeaders: every answer says nosniff, and no error answer may
// be cached, whoever made it (a backend or NGINX).
func TestSecurityHeaders(t *testing.T) {
	s := newStack(t)
	for _, tt := range []struct {
		name, method, path string
		wantStatus         int
		wantServedBy       string
	}{
		{"listing", "GET", "/us/properties/1", http.StatusOK, "us"},
		{"backend_404", "GET", "/us/properties/99999999", http.StatusNotFound, "us"},
		{"backend_400", "PUT", "/eu/properties/1", http.StatusBadRequest, "eu"},
		{"backend_405", "POST", "/eu/properties/1", http.StatusMethodNotAllowed, "eu"},
		// A method the API never serves stops at NGINX: no backend counts
		// it, so a made-up one cannot add a metric series (metrics.go).
		{"nginx_405", "PATCH", "/eu/properties/1", http.StatusMethodNotAllowed, "nginx"},
		{"nginx_405_made_up", "BREW", "/us/properties", http.StatusMethodNotAllowed, "nginx"},
		{"nginx_404", "GET", "/metrics", http.StatusNotFound, "nginx"},
	} {
		status, h, _, err := s.doWith(tt.method, tt.path, http.Header{}, "")
		if err != nil || status != tt.wantStatus || h.Get("X-Served-By") != tt.wantServedBy {
			t.Errorf("%s: %d from %q (%v), want %d from %s", tt.name, status, h.Get("X-Served-By"), err, tt.wantStatus, tt.wantServedBy)
			continue
		}
		wantCache := ""
		if status >= 400 {
			wantCache = "no-store"
		}
		if h.Get("X-Content-Type-Options") != "nosniff" || h.Get("Cache-Control") != wantCache {
			t.Errorf("%s: X-Content-Type-Options %q, Cache-Control %q; want nosniff, %q", tt.name,
				h.Get("X-Content-Type-Options"), h.Get("Cache-Control"), wantCache)
		}
	}
}
