package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/joho/godotenv"
)

func TestLoadConfig(t *testing.T) {
	t.Parallel()
	cfg, err := loadConfig(testEnv("http://127.0.0.1:9//", map[string]string{
		"PORT":                        "9090",
		"SPOTIFY_TIMEOUT":             "30s",
		"SPOTIFY_CLIENT_CALLBACK_URL": "com.example.app:/oauth, http://127.0.0.1:8888/callback",
		"ENCRYPTION_SECRET":           strings.Repeat("s", 32) + ", " + testSecret + "-old",
		"CORS_ALLOWED_ORIGINS":        "https://app.example.com, http://127.0.0.1:5173, http://[::1]:8000",
		"RATE_LIMIT":                  "5/min",
		"TRUST_PROXY":                 "2",
		"SHUTDOWN_DELAY":              "15s",
		"METRICS_ADDR":                "127.0.0.1:9091",
	}), nil)
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if cfg.clientID != testClientID || cfg.clientSecret != testClientSecret || cfg.port != "9090" ||
		cfg.accountsURL != "http://127.0.0.1:9" || cfg.spotifyTimeout != 30*time.Second ||
		strings.Join(cfg.callbackURLs, " ") != "com.example.app:/oauth http://127.0.0.1:8888/callback" ||
		strings.Join(cfg.corsOrigins, " ") != "https://app.example.com http://127.0.0.1:5173 http://[::1]:8000" ||
		cfg.sealer == nil || len(cfg.sealer.aeads) != 2 ||
		cfg.rateLimit != 5 || cfg.ratePer != time.Minute || cfg.trustProxy.hops != 2 || cfg.shutdownDelay != 15*time.Second ||
		cfg.metricsAddr != "127.0.0.1:9091" || len(cfg.warnings) != 0 {
		t.Errorf("loadConfig = %+v", cfg)
	}
	// A request in flight at SIGTERM may still be reading its body, then
	// spend a single-use code at Spotify: the drain waits for both.
	if cfg.shutdownTimeout != 41*time.Second {
		t.Errorf("shutdown grace with SPOTIFY_TIMEOUT=30s = %v, want 41s (10 s read + 30 s + 1 s)", cfg.shutdownTimeout)
	}

	cfg, err = loadConfig(map[string]string{"SPOTIFY_CLIENT_ID": "id", "SPOTIFY_CLIENT_SECRET": "secret", "SPOTIFY_CLIENT_CALLBACK_URL": "myapp://cb"}, nil)
	if err != nil {
		t.Fatalf("loadConfig with defaults: %v", err)
	}
	if cfg.port != "8080" || cfg.accountsURL != "https://accounts.spotify.com" || cfg.spotifyTimeout != 10*time.Second ||
		cfg.sealer != nil || cfg.corsOrigins != nil || cfg.rateLimit != 0 || cfg.trustProxy.hops != 0 || cfg.shutdownDelay != 0 || cfg.metricsAddr != "" ||
		cfg.readHeaderTimeout != 5*time.Second || cfg.readTimeout != 10*time.Second || cfg.idleTimeout != 60*time.Second ||
		cfg.shutdownTimeout != 21*time.Second || cfg.connectionLimit != 256 || cfg.trustProxy.proxies != nil || cfg.trustProxy.header != "" {
		t.Errorf("loadConfig defaults = %+v", cfg)
	}
	for spotifyTimeout, want := range map[string]time.Duration{"2s": 13 * time.Second, "9s": 20 * time.Second, "12s": 23 * time.Second} {
		cfg, _ = loadConfig(testEnv("", map[string]string{"SPOTIFY_TIMEOUT": spotifyTimeout}), nil)
		if cfg.shutdownTimeout != want {
			t.Errorf("shutdown grace with SPOTIFY_TIMEOUT=%s = %v, want %v", spotifyTimeout, cfg.shutdownTimeout, want)
		}
	}
	for _, accounts := range []string{"http://localhost:8089", "http://[::1]:8089", "http://127.0.0.2:8089"} {
		cfg, err = loadConfig(testEnv(accounts, map[string]string{"RATE_LIMIT": "off", "CONNECTION_LIMIT": "off", "TRUST_PROXY": "10", "PORT": "65535"}), nil)
		if err != nil || cfg.rateLimit != 0 || cfg.connectionLimit != 0 || cfg.accountsURL != accounts || cfg.trustProxy.hops != 10 || cfg.port != "65535" {
			t.Errorf("RATE_LIMIT=off, CONNECTION_LIMIT=off, TRUST_PROXY=10, PORT=65535, accounts on %s: loadConfig = %+v, %v", accounts, cfg, err)
		}
	}
	for setting, want := range map[string][2]any{"10/s": {10, time.Second}, "600/h": {600, time.Hour}, " 3/min ": {3, time.Minute}} {
		cfg, _ = loadConfig(testEnv("", map[string]string{"RATE_LIMIT": setting}), nil)
		if cfg.rateLimit != want[0] || cfg.ratePer != want[1] {
			t.Errorf("RATE_LIMIT=%s: %d per %v, want %v per %v", setting, cfg.rateLimit, cfg.ratePer, want[0], want[1])
		}
	}
}

// TestLookalikeSettings checks that a variable that looks like a setting
// but is none gets a warning naming it and the closest setting, never its
// value, and that where it leaves a setting missing, the error says so.
func TestLookalikeSettings(t *testing.T) {
	t.Parallel()
	// Each name, set with a value, and the setting its warning must name
	// ("" for none: not a look-alike).
	names := map[string]string{
		"SPOTIFY_CLIENT_SECERT":     "SPOTIFY_CLIENT_SECRET",
		"SPOTIFY_CLIENTID":          "SPOTIFY_CLIENT_ID",
		"SPOTIFY_SECRET":            "SPOTIFY_CLIENT_SECRET",
		"CLIENT_ID":                 "SPOTIFY_CLIENT_ID",
		"CLIENT_SECRET":             "SPOTIFY_CLIENT_SECRET",
		"SPOTIFY_REDIRECT_URI":      "SPOTIFY_CLIENT_CALLBACK_URL", // as other swap services name it
		"SPOTIFY_CALLBACK_URL":      "SPOTIFY_CLIENT_CALLBACK_URL",
		"CORS_ALLOWED_ORIGIN":       "CORS_ALLOWED_ORIGINS",
		"ENCRYPTION_KEY":            "ENCRYPTION_SECRET",
		"SPOTIFY_ENCRYPTION_SECRET": "ENCRYPTION_SECRET",
		"RATE_LIMITS":               "RATE_LIMIT",
		"RATELIMIT":                 "RATE_LIMIT",
		"SPOTIFY_RATE_LIMIT":        "RATE_LIMIT",
		"TRUST_PROXIES":             "TRUST_PROXY",
		"TRUSTED_PROXIES":           "TRUST_PROXY",
		"CONNECTIONS_LIMIT":         "CONNECTION_LIMIT",
		"CONNECTION_MAX":            "CONNECTION_LIMIT",
		"REDIRECT_URI":              "SPOTIFY_CLIENT_CALLBACK_URL", // no prefix: other services' words for ours
		"CALLBACK_URL":              "SPOTIFY_CLIENT_CALLBACK_URL",
		"METRICS_PORT":              "METRICS_ADDR",
		"METRIC_ADDR":               "METRICS_ADDR",
		"SPOTIFY_PORT":              "PORT",
		"SHUTDOWN_DELAY_S":          "SHUTDOWN_DELAY",
		"SHUTDOWN_TIMEOUT":          "SHUTDOWN_DELAY",
		"CORS_ORIGIN":               "CORS_ALLOWED_ORIGINS", // as other services name it
		"TRUST_PROXY_COUNT":         "TRUST_PROXY",
		"SPOTIFY_TIMEOUTS":          "SPOTIFY_TIMEOUT",
		"SPOTIFY_TIME":              "SPOTIFY_TIMEOUT", // as near ID as TIMEOUT by shape: the whole name decides
		"SPOTIFY_URL":               "SPOTIFY_ACCOUNTS_URL",
		"SPOTIFY_LIMIT":             "RATE_LIMIT",
		"SPOTIFY_ACCOUNTS":          "SPOTIFY_ACCOUNTS_URL",
		"SPOTIFY_CLIENT_CALLBACK":   "SPOTIFY_CLIENT_CALLBACK_URL",
		"spotify_client_secret":     "SPOTIFY_CLIENT_SECRET", // lower case, as in some .env files
		"rate_limit":                "RATE_LIMIT",
		"spotify_client_secert":     "SPOTIFY_CLIENT_SECRET", // a typo in lower case: the prefix in any case
		"Trust_Proxy":               "TRUST_PROXY",
		"http_proxy":                "", // lower case, and not ours
		"port":                      "PORT",
		"HOME":                      "", // not ours
		"PATH":                      "", // two letters from PORT, and no look-alike
		"UID":                       "", // one letter from ID: a name must match a setting's words, or have its prefix
		"HOSTNAME":                  "",
		"GENERATE_SOURCEMAP":        "", // holds RATE_, but does not start with it
		"MY_SPOTIFY_TOKEN":          "",
		"SPOTIFY_TIMEOUT":           "", // a setting
	}
	set := map[string]string{}
	var want []string
	for name, closest := range names {
		set[name] = "value-of-" + name
		if closest != "" {
			want = append(want, name+" is not a setting of this service: a typo of "+closest+"?")
		}
	}
	slices.Sort(want)
	set["SPOTIFY_TIMEOUT"] = "5s"
	env := testEnv("https://accounts.spotify.com", set)
	cfg, err := loadConfig(env, nil)
	if err != nil {
		t.Fatalf("loadConfig: %v", err)
	}
	if !slices.Equal(cfg.warnings, want) {
		t.Errorf("warnings:\n%s\nwant:\n%s", strings.Join(cfg.warnings, "\n"), strings.Join(want, "\n"))
	}

	delete(env, "SPOTIFY_CLIENT_SECRET")
	_, err = loadConfig(env, nil)
	if err == nil || !strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECRET is not set") ||
		!strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECERT is not a setting of this service: a typo of SPOTIFY_CLIENT_SECRET?") {
		t.Errorf("loadConfig with the secret under a misspelt name = %v, want both the missing setting and the typo named", err)
	}
	if strings.Contains(err.Error()+strings.Join(cfg.warnings, ""), "value-of-") {
		t.Errorf("a warning shows a value: %v", err)
	}
}

// TestLoadConfigProblems checks that each bad setting is named, and that all
// problems come in one error.
func TestLoadConfigProblems(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		want []string // each must appear in the error
	}{
		{"client ID missing", map[string]string{"SPOTIFY_CLIENT_ID": ""}, []string{"SPOTIFY_CLIENT_ID is not set"}},
		{"client ID blank", map[string]string{"SPOTIFY_CLIENT_ID": "  "}, []string{"SPOTIFY_CLIENT_ID is not set"}},
		{"client secret missing", map[string]string{"SPOTIFY_CLIENT_SECRET": ""}, []string{"SPOTIFY_CLIENT_SECRET is not set"}},
		{"callback missing", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": ""}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is not set"}},
		{"all three missing", map[string]string{"SPOTIFY_CLIENT_ID": "", "SPOTIFY_CLIENT_SECRET": "", "SPOTIFY_CLIENT_CALLBACK_URL": ""},
			[]string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_CALLBACK_URL"}},
		{"client ID placeholder", map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID}, []string{"SPOTIFY_CLIENT_ID is still the placeholder"}},
		{"client secret placeholder", map[string]string{"SPOTIFY_CLIENT_SECRET": placeholderClientSecret}, []string{"SPOTIFY_CLIENT_SECRET is still the placeholder"}},
		{"callback placeholder", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": placeholderCallbackURL}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is still the placeholder"}},
		{"callback not a URL", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "callback"}, []string{`SPOTIFY_CLIENT_CALLBACK_URL: "callback"`}},
		{"callback list with an empty item", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "myapp://cb,"}, []string{`SPOTIFY_CLIENT_CALLBACK_URL: ""`}},
		{"port not a number", map[string]string{"PORT": "http"}, []string{`PORT: "http"`}},
		{"port too large", map[string]string{"PORT": "65536"}, []string{`PORT: "65536"`}},
		{"port negative", map[string]string{"PORT": "-1"}, []string{`PORT: "-1"`}},
		{"accounts URL not http", map[string]string{"SPOTIFY_ACCOUNTS_URL": "ftp://accounts.spotify.com"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"accounts URL without host", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"accounts URL with query", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com/?x=1"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"timeout without unit", map[string]string{"SPOTIFY_TIMEOUT": "10"}, []string{`SPOTIFY_TIMEOUT: "10"`}},
		{"timeout zero", map[string]string{"SPOTIFY_TIMEOUT": "0s"}, []string{`SPOTIFY_TIMEOUT: "0s"`}},
		{"timeout negative", map[string]string{"SPOTIFY_TIMEOUT": "-1s"}, []string{`SPOTIFY_TIMEOUT: "-1s"`}},
		{"secret placeholder", map[string]string{"ENCRYPTION_SECRET": placeholderSecret}, []string{"ENCRYPTION_SECRET is still the placeholder"}},
		{"secret short", map[string]string{"ENCRYPTION_SECRET": strings.Repeat("s", 31)}, []string{"ENCRYPTION_SECRET: secret 1 of the list has 31 characters"}},
		{"second secret short", map[string]string{"ENCRYPTION_SECRET": testSecret + ",short"}, []string{"ENCRYPTION_SECRET: secret 2 of the list has 5 characters"}},
		{"secret short in characters, long in bytes", map[string]string{"ENCRYPTION_SECRET": strings.Repeat("é", 16)}, []string{"ENCRYPTION_SECRET: secret 1 of the list has 16 characters"}},
		{"second secret the placeholder", map[string]string{"ENCRYPTION_SECRET": testSecret + "," + placeholderSecret}, []string{"ENCRYPTION_SECRET is still the placeholder"}},
		{"origin with a trailing slash", map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com/"}, []string{`CORS_ALLOWED_ORIGINS: "https://app.example.com/" has a path, which an origin never has: write https://app.example.com`}},
		{"origin with a path, as GitHub Pages shows it", map[string]string{"CORS_ALLOWED_ORIGINS": "https://user.github.io/repo"}, []string{"write https://user.github.io"}},
		{"origin a prefix of another's", map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com, https://"}, []string{`CORS_ALLOWED_ORIGINS: "https://" is not an origin`}},
		{"secret with an inline comment, as docker --env-file keeps it", map[string]string{"SPOTIFY_CLIENT_SECRET": "abc-secret-value # prod"}, []string{`SPOTIFY_CLIENT_SECRET has a comment after " #"`}},
		{"rate limit with an inline comment", map[string]string{"RATE_LIMIT": "10/min # for now"}, []string{`RATE_LIMIT has a comment after " #"`, `RATE_LIMIT: "10/min # for now"`}},
		{"rate limit in quotes", map[string]string{"RATE_LIMIT": `'10/min'`}, []string{"RATE_LIMIT is in quotes", `RATE_LIMIT: "'10/min'"`}},
		{"accounts URL on a look-alike of localhost", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://localhost.attacker.example"}, []string{"plain http to another machine"}},
		{"accounts URL on a name made of a loopback address", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://127.0.0.1.nip.io:8080"}, []string{"plain http to another machine"}},
		{"accounts URL on the unspecified address", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://0.0.0.0:8080"}, []string{"plain http to another machine"}},
		{"accounts URL on a name ending in localhost", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://notlocalhost:8080"}, []string{"plain http to another machine"}},
		{"accounts URL with a password and a bad scheme", map[string]string{"SPOTIFY_ACCOUNTS_URL": "ftp://user:hunter2-password@accounts.example"}, []string{"must not hold a user or password"}},
		{"accounts URL with a password and a query", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://user:hunter2-password@accounts.example/?x=1"}, []string{"must not hold a user or password"}},
		{"accounts URL in capitals, in clear", map[string]string{"SPOTIFY_ACCOUNTS_URL": "HTTP://accounts.spotify.com"}, []string{"plain http to another machine"}},
		{"accounts URL with a user on loopback", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://localhost@accounts.spotify.com"}, []string{"must not hold a user or password"}},
		{"trust proxy trusting everyone", map[string]string{"TRUST_PROXY": "10.0.0.0/8, 0.0.0.0/0"}, []string{"0.0.0.0/0 trusts far more than a proxy's addresses"}},
		{"accounts URL in clear to a link-local address", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://169.254.169.254"}, []string{"plain http to another machine"}},
		{"accounts URL in clear to a link-local IPv6 address", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://[fe80::1]:8080"}, []string{"plain http to another machine"}},
		{"accounts URL in clear to a name under localhost, which DNS may answer", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://accounts.localhost:8080"}, []string{"plain http to another machine"}},
		{"accounts URL with a password, that does not parse", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://user:hunter2-password@accounts example.com"}, []string{"must not hold a user or password"}},
		{"accounts URL with an empty query", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com?"}, []string{`SPOTIFY_ACCOUNTS_URL: "https://accounts.spotify.com?" is not`}},
		{"secret list with a trailing comma", map[string]string{"ENCRYPTION_SECRET": testSecret + ","}, []string{"ENCRYPTION_SECRET: secret 2 of the list has 0 characters"}},
		{"metrics on PORT, not the default one", map[string]string{"PORT": "9090", "METRICS_ADDR": "127.0.0.1:9090"}, []string{`METRICS_ADDR: "127.0.0.1:9090" is on PORT`}},
		{"trust proxy X-Forwarded-For by name", map[string]string{"TRUST_PROXY": "X-Forwarded-For"}, []string{"X-Forwarded-For is a list that clients add to"}},
		{"trust proxy with an empty item", map[string]string{"TRUST_PROXY": "10.0.0.1,,10.0.0.2"}, []string{`TRUST_PROXY: "10.0.0.1,,10.0.0.2" is neither`}},
		{"connection limit of zero", map[string]string{"CONNECTION_LIMIT": "0"}, []string{`CONNECTION_LIMIT: "0"`}},
		{"connection limit negative", map[string]string{"CONNECTION_LIMIT": "-1"}, []string{`CONNECTION_LIMIT: "-1"`}},
		{"connection limit in words", map[string]string{"CONNECTION_LIMIT": "many"}, []string{`CONNECTION_LIMIT: "many"`}},
		{"origin without scheme", map[string]string{"CORS_ALLOWED_ORIGINS": "app.example.com"}, []string{`CORS_ALLOWED_ORIGINS: "app.example.com"`}},
		{"origin in capitals", map[string]string{"CORS_ALLOWED_ORIGINS": "https://App.example.com"}, []string{`CORS_ALLOWED_ORIGINS: "https://App.example.com"`}},
		{"origin with a query", map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com?x"}, []string{`CORS_ALLOWED_ORIGINS: "https://app.example.com?x" is not an origin`}},
		{"origin with a user", map[string]string{"CORS_ALLOWED_ORIGINS": "https://me@app.example.com"}, []string{`CORS_ALLOWED_ORIGINS: "https://me@app.example.com" is not an origin`}},
		{"star among origins", map[string]string{"CORS_ALLOWED_ORIGINS": "*, https://app.example.com"}, []string{"* allows every origin and must stand alone"}},
		{"origin with the default https port", map[string]string{"CORS_ALLOWED_ORIGINS": "https://app.example.com:443"}, []string{"names the default port, which browsers leave out of Origin: write https://app.example.com"}},
		{"origin with the default http port", map[string]string{"CORS_ALLOWED_ORIGINS": "http://app.example.com:80"}, []string{"write http://app.example.com"}},
		{"origin not in ASCII", map[string]string{"CORS_ALLOWED_ORIGINS": "https://bücher.example"}, []string{"punycode"}},
		{"callback without //", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "localhost:3000/cb"}, []string{`"localhost:3000/cb" has no // after "localhost:"`}},
		{"callback placeholder among others", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": "myapp://cb," + placeholderCallbackURL}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is still the placeholder"}},
		{"accounts URL with a password", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://user:hunter2-password@accounts.spotify.com"}, []string{"SPOTIFY_ACCOUNTS_URL must not hold a user or password"}},
		{"accounts URL in clear over the network", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://accounts.spotify.com"}, []string{"plain http to another machine"}},
		{"accounts URL in clear to a LAN host", map[string]string{"SPOTIFY_ACCOUNTS_URL": "http://192.168.1.10:8080"}, []string{"plain http to another machine"}},
		{"accounts URL is the token endpoint", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com/api/token"}, []string{"is the token endpoint; give the base URL"}},
		{"secret in quotes, as docker --env-file keeps them", map[string]string{"SPOTIFY_CLIENT_SECRET": `"quoted-secret-value"`}, []string{"SPOTIFY_CLIENT_SECRET is in quotes"}},
		{"callback in single quotes", map[string]string{"SPOTIFY_CLIENT_CALLBACK_URL": `'myapp://cb'`}, []string{"SPOTIFY_CLIENT_CALLBACK_URL is in quotes", `"'myapp://cb'" is not an absolute URL`}},
		{"client ID an empty pair of quotes", map[string]string{"SPOTIFY_CLIENT_ID": `""`}, []string{"SPOTIFY_CLIENT_ID is in quotes"}},
		{"accounts URL is the token endpoint behind a prefix", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://gw.example.com/spotify/api/token"}, []string{"is the token endpoint"}},
		{"accounts URL with a fragment", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com/#x"}, []string{"SPOTIFY_ACCOUNTS_URL"}},
		{"accounts URL with an empty fragment", map[string]string{"SPOTIFY_ACCOUNTS_URL": "https://accounts.spotify.com#"}, []string{`SPOTIFY_ACCOUNTS_URL: "https://accounts.spotify.com#" is not`}},
		{"trust proxy one too many", map[string]string{"TRUST_PROXY": "11"}, []string{`TRUST_PROXY: "11"`}},
		{"rate limit without a period", map[string]string{"RATE_LIMIT": "10"}, []string{`RATE_LIMIT: "10"`}},
		{"rate limit per day", map[string]string{"RATE_LIMIT": "10/day"}, []string{`RATE_LIMIT: "10/day"`}},
		{"rate limit of zero", map[string]string{"RATE_LIMIT": "0/min"}, []string{`RATE_LIMIT: "0/min"`}},
		{"rate limit negative", map[string]string{"RATE_LIMIT": "-5/s"}, []string{`RATE_LIMIT: "-5/s"`}},
		{"rate limit in words", map[string]string{"RATE_LIMIT": "ten/min"}, []string{`RATE_LIMIT: "ten/min"`}},
		{"trust proxy not a number", map[string]string{"TRUST_PROXY": "yes"}, []string{`TRUST_PROXY: "yes"`}},
		{"trust proxy negative", map[string]string{"TRUST_PROXY": "-1"}, []string{`TRUST_PROXY: "-1"`}},
		{"trust proxy a port, by mistake", map[string]string{"TRUST_PROXY": "8080"}, []string{`TRUST_PROXY: "8080"`}},
		{"shutdown delay without unit", map[string]string{"SHUTDOWN_DELAY": "15"}, []string{`SHUTDOWN_DELAY: "15"`}},
		{"shutdown delay negative", map[string]string{"SHUTDOWN_DELAY": "-1s"}, []string{`SHUTDOWN_DELAY: "-1s"`}},
		{"metrics address without a port", map[string]string{"METRICS_ADDR": "9090"}, []string{`METRICS_ADDR: "9090"`}},
		{"metrics address with a bad port", map[string]string{"METRICS_ADDR": "127.0.0.1:99999"}, []string{`METRICS_ADDR: "127.0.0.1:99999"`}},
		{"metrics on the service's port", map[string]string{"METRICS_ADDR": ":8080"}, []string{`METRICS_ADDR: ":8080" is on PORT`}},
		{"everything wrong at once",
			map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID, "SPOTIFY_CLIENT_SECRET": "", "PORT": "x", "SPOTIFY_TIMEOUT": "soon", "ENCRYPTION_SECRET": "short"},
			[]string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "PORT", "SPOTIFY_TIMEOUT", "ENCRYPTION_SECRET"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := loadConfig(testEnv("https://accounts.spotify.com", tt.env), nil)
			if err == nil {
				t.Fatalf("loadConfig = nil error, want one naming %q", tt.want)
			}
			for _, want := range tt.want {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("loadConfig error %q does not name %q", err, want)
				}
			}
			if lines := strings.Count(err.Error(), "\n") + 1; lines != len(tt.want) {
				t.Errorf("loadConfig error has %d problems, want %d:\n%v", lines, len(tt.want), err)
			}
			secrets := append(splitList(tt.env["ENCRYPTION_SECRET"]), tt.env["SPOTIFY_CLIENT_SECRET"], testClientSecret, "hunter2-password", "quoted-secret-value", "abc-secret-value")
			for _, secret := range secrets {
				if secret != "" && strings.Contains(err.Error(), secret) {
					t.Errorf("loadConfig error %q shows the secret %q", err, secret)
				}
			}
		})
	}
}

// TestEmptyVariablesHideDotenv checks that a setting the environment sets
// empty while .env gives it a value is reported: an error for a required
// one, a warning for the others, which take their defaults; and a callback
// URL on localhost, which Spotify refuses, gets a warning.
func TestEmptyVariablesHideDotenv(t *testing.T) {
	t.Parallel()
	dotenv := map[string]string{
		"PORT":                  "8081",
		"SPOTIFY_CLIENT_SECRET": "secret-from-dotenv",
		"ENCRYPTION_SECRET":     testSecret,
		"CORS_ALLOWED_ORIGINS":  "https://app.example.com",
		"RATE_LIMIT":            "10/min",
		"METRICS_ADDR":          ":9090",
	}
	env := testEnv("https://accounts.spotify.com", map[string]string{"SPOTIFY_CLIENT_SECRET": "", "ENCRYPTION_SECRET": " ", "CORS_ALLOWED_ORIGINS": "", "PORT": "", "METRICS_ADDR": ""})
	_, err := loadConfig(env, dotenv)
	if err == nil || !strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECRET is empty in the environment, which hides the value that .env gives it") ||
		strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECRET is not set") || strings.Contains(err.Error(), "secret-from-dotenv") {
		t.Errorf("loadConfig with SPOTIFY_CLIENT_SECRET= over .env's = %v, want the hidden value named, not shown", err)
	}
	env["SPOTIFY_CLIENT_SECRET"] = testClientSecret
	env["RATE_LIMIT"] = "10/min" // the environment's own: nothing hidden
	env["SPOTIFY_CLIENT_CALLBACK_URL"] = "http://localhost:8888/callback, myapp://cb, http://127.0.0.1:8888/callback, http://LocalHost/cb"
	cfg, err := loadConfig(env, dotenv)
	want := []string{
		`SPOTIFY_CLIENT_CALLBACK_URL: "http://localhost:8888/callback" is on localhost, which Spotify refuses in redirect URIs: register and use 127.0.0.1 or [::1] instead`,
		`SPOTIFY_CLIENT_CALLBACK_URL: "http://LocalHost/cb" is on localhost, which Spotify refuses in redirect URIs: register and use 127.0.0.1 or [::1] instead`,
		"PORT is empty in the environment, which hides the value that .env gives it: it is 8080; unset the variable to use .env's",
		"ENCRYPTION_SECRET is empty in the environment, which hides the value that .env gives it: it is off; unset the variable to use .env's",
		"CORS_ALLOWED_ORIGINS is empty in the environment, which hides the value that .env gives it: it is off; unset the variable to use .env's",
		"METRICS_ADDR is empty in the environment, which hides the value that .env gives it: it is off; unset the variable to use .env's",
	}
	if err != nil || !slices.Equal(cfg.warnings, want) || cfg.sealer != nil || cfg.corsOrigins != nil || len(cfg.callbackURLs) != 4 || cfg.port != "8080" || cfg.metricsAddr != "" {
		t.Errorf("loadConfig with ENCRYPTION_SECRET and CORS_ALLOWED_ORIGINS empty over .env's: %v, warnings\n%s\nwant\n%s\nand sealing and CORS off, every callback kept",
			err, strings.Join(cfg.warnings, "\n"), strings.Join(want, "\n"))
	}
}

// TestRunRefusesBadConfig checks that run stops before listening, with the
// error main turns into exit status 2.
func TestRunRefusesBadConfig(t *testing.T) {
	t.Parallel()
	env := testEnv("https://accounts.spotify.com", map[string]string{"SPOTIFY_CLIENT_SECRET": "", "PORT": "1"})
	err := run(t.Context(), nil, env, nil, io.Discard, io.Discard)
	if !errors.As(err, new(setupError)) || !strings.Contains(err.Error(), "SPOTIFY_CLIENT_SECRET is not set") {
		t.Errorf("run = %v, want a setupError naming SPOTIFY_CLIENT_SECRET", err)
	}
}

// TestReadEnv checks that .env is read, that the environment wins over it,
// and that a .env that does not parse is reported without being quoted.
func TestReadEnv(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env, dotenv, err := readEnv(filepath.Join(dir, "missing.env"), []string{"PORT=9000"})
	if err != nil || dotenv != nil || env["PORT"] != "9000" {
		t.Errorf("readEnv(missing file) = %v, .env %v, %v; want the environment, no .env, no error", env, dotenv, err)
	}

	good := filepath.Join(dir, "good.env")
	if err := os.WriteFile(good, []byte("SPOTIFY_CLIENT_ID=from-file\nPORT=8081\n# a comment\nSPOTIFY_TIMEOUT=\"3s\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	env, dotenv, err = readEnv(good, []string{"PORT=9000", "EMPTY=", "A=b=c"})
	want := map[string]string{"SPOTIFY_CLIENT_ID": "from-file", "PORT": "9000", "SPOTIFY_TIMEOUT": "3s", "EMPTY": "", "A": "b=c"}
	wantFile := map[string]string{"SPOTIFY_CLIENT_ID": "from-file", "PORT": "8081", "SPOTIFY_TIMEOUT": "3s"}
	if err != nil || !maps.Equal(dotenv, wantFile) || !maps.Equal(env, want) {
		t.Errorf("readEnv(.env, environment) = %v, .env %v, %v; want %v, the environment winning, and .env's own %v", env, dotenv, err, want, wantFile)
	}

	// godotenv's own error would quote this line, secret and all.
	bad := filepath.Join(dir, "bad.env")
	if err := os.WriteFile(bad, []byte("SPOTIFY_CLIENT_SECRET=\"s3cr3t-value\nPORT=8080\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, _, err = readEnv(bad, nil)
	if !errors.As(err, new(setupError)) || strings.Contains(err.Error(), "s3cr3t") {
		t.Errorf("readEnv(unterminated quote) = %v, want a setupError that does not quote the file", err)
	}

	// Only a missing .env is no error: one that cannot be read is.
	_, _, err = readEnv(dir, nil)
	if !errors.As(err, new(setupError)) || !strings.Contains(err.Error(), "reading "+dir) {
		t.Errorf("readEnv(a directory) = %v, want a setupError saying it cannot be read", err)
	}
}

func TestFlags(t *testing.T) {
	t.Parallel()
	var stdout, stderr strings.Builder
	if err := run(t.Context(), []string{"-version"}, testEnv("", nil), nil, &stdout, &stderr); err != nil {
		t.Errorf("run -version = %v", err)
	}
	// Without -X main.version, the module's version: go test's binary has none.
	if got, want := stdout.String(), "(devel)\n"; got != want {
		t.Errorf("run -version printed %q, want %q", got, want)
	}

	stdout.Reset()
	if err := run(t.Context(), []string{"-h"}, testEnv("", nil), nil, &stdout, &stderr); err != nil || !strings.Contains(stdout.String(), "Usage:") || stderr.Len() != 0 {
		t.Errorf("run -h = %v, printing %q and %q to stderr; want the usage on stdout, as asked for", err, stdout.String(), stderr.String())
	}
	for _, s := range settingsTable() {
		if name := s.name; !strings.Contains(stdout.String(), name) {
			t.Errorf("run -h does not name %s", name)
		}
	}
	stderr.Reset()
	err := run(t.Context(), []string{"-verbose"}, testEnv("", nil), nil, io.Discard, &stderr)
	if !errors.As(err, new(setupError)) || !strings.Contains(stderr.String(), "-healthcheck") {
		t.Errorf("run -verbose = %v with output %q, want a setupError and the usage", err, stderr.String())
	}
	// Cancelled already: should the argument be taken for serving, run
	// returns at once instead of serving on.
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()
	err = run(cancelled, []string{"serve"}, testEnv("", map[string]string{"PORT": "0"}), nil, io.Discard, io.Discard)
	if !errors.As(err, new(setupError)) {
		t.Errorf("run serve = %v, want a setupError", err)
	}
}

func TestCheck(t *testing.T) {
	t.Parallel()
	t.Run("accepted", func(t *testing.T) {
		t.Parallel()
		spotify := newFakeSpotify(t, likeSpotify)
		var stdout strings.Builder
		if err := run(t.Context(), []string{"-check"}, testEnv(spotify.url, nil), nil, &stdout, io.Discard); err != nil {
			t.Errorf("run -check = %v, want nil", err)
		}
		if got, want := stdout.String(), "ok: credentials accepted by "+spotify.url+"\n"; got != want {
			t.Errorf("run -check printed %q, want %q", got, want)
		}
		if forms := spotify.received(); len(forms) != 1 || forms[0] != "grant_type=client_credentials" {
			t.Errorf("Spotify received %q, want [grant_type=client_credentials]", forms)
		}
	})
	t.Run("a misspelt setting", func(t *testing.T) {
		t.Parallel()
		spotify := newFakeSpotify(t, likeSpotify)
		var stdout, stderr strings.Builder
		env := testEnv(spotify.url, map[string]string{"CORS_ALLOWED_ORIGIN": "https://app.example.com"})
		if err := run(t.Context(), []string{"-check"}, env, nil, &stdout, &stderr); err != nil {
			t.Errorf("run -check = %v, want nil", err)
		}
		if !strings.HasPrefix(stdout.String(), "ok: ") || stderr.String() != "warning: CORS_ALLOWED_ORIGIN is not a setting of this service: a typo of CORS_ALLOWED_ORIGINS?\n" {
			t.Errorf("run -check printed %q and on stderr %q; want ok on stdout and the warning on stderr", stdout.String(), stderr.String())
		}
	})
	for body, want := range map[string]string{
		`{}`:                         "answered 401: the answer is not an OAuth error",
		`{"error":"invalid_client"}`: "answered 401: invalid_client: check SPOTIFY_CLIENT_ID and SPOTIFY_CLIENT_SECRET against the app's settings in the Spotify dashboard",
	} {
		spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
			w.WriteHeader(401)
			io.WriteString(w, body)
		})
		err := run(t.Context(), []string{"-check"}, testEnv(spotify.url, nil), nil, io.Discard, io.Discard)
		if err == nil || !strings.HasSuffix(err.Error(), want) {
			t.Errorf("run -check against a 401 %s = %v, want an error ending %q", body, err, want)
		}
	}
	t.Run("rejected", func(t *testing.T) {
		t.Parallel()
		spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
			spotifyError(w, 400, "invalid_client", "Invalid client secret")
		})
		err := run(t.Context(), []string{"-check"}, testEnv(spotify.url, nil), nil, io.Discard, io.Discard)
		if err == nil || errors.As(err, new(setupError)) || !strings.Contains(err.Error(), "invalid_client: Invalid client secret") {
			t.Errorf("run -check = %v, want an error with Spotify's description", err)
		}
		if err != nil && strings.Contains(err.Error(), testClientSecret) {
			t.Errorf("run -check error %q shows the secret", err)
		}
	})
	t.Run("unreachable", func(t *testing.T) {
		t.Parallel()
		err := run(t.Context(), []string{"-check"}, testEnv("http://"+refusedAddr(t), nil), nil, io.Discard, io.Discard)
		if !errors.Is(err, errSpotifyUnreachable) || errors.As(err, new(setupError)) {
			t.Errorf("run -check = %v, want errSpotifyUnreachable, no setupError: exit 1, not 2", err)
		}
	})
	t.Run("bad configuration", func(t *testing.T) {
		t.Parallel()
		err := run(t.Context(), []string{"-check"}, testEnv("", map[string]string{"SPOTIFY_CLIENT_ID": placeholderClientID}), nil, io.Discard, io.Discard)
		if !errors.As(err, new(setupError)) {
			t.Errorf("run -check = %v, want a setupError", err)
		}
	})
}

func TestHealthcheck(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "http://127.0.0.1:9", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	svc := wire(cfg, slog.New(slog.DiscardHandler), testSpotifyClient(cfg))
	srv := &http.Server{Handler: svc}
	go srv.Serve(ln)
	port := ln.Addr().(*net.TCPAddr).Port
	env := testEnv("", map[string]string{"PORT": " " + strconv.Itoa(port) + " "}) // trimmed, as the server does
	if err := run(t.Context(), []string{"-healthcheck"}, env, nil, io.Discard, io.Discard); err != nil {
		t.Errorf("run -healthcheck against a running service = %v, want nil", err)
	}
	svc.stopping.Store(true)
	if err := run(t.Context(), []string{"-healthcheck"}, env, nil, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("run -healthcheck against a service that is stopping = %v, want an error naming its 503", err)
	}
	srv.Close()
	// Nothing on PORT: a port nothing listens on, not the one just closed,
	// which a parallel test's listener could take.
	_, refused, _ := net.SplitHostPort(refusedAddr(t))
	if err := run(t.Context(), []string{"-healthcheck"}, map[string]string{"PORT": refused}, nil, io.Discard, io.Discard); err == nil {
		t.Errorf("run -healthcheck with nothing on PORT = nil, want an error")
	}
	// Something else on PORT, answering 404: not the service, not healthy.
	other := httptest.NewServer(http.NotFoundHandler())
	defer other.Close()
	otherPort := map[string]string{"PORT": strconv.Itoa(other.Listener.Addr().(*net.TCPAddr).Port)}
	if err := run(t.Context(), []string{"-healthcheck"}, otherPort, nil, io.Discard, io.Discard); err == nil || !strings.Contains(err.Error(), "404") {
		t.Errorf("run -healthcheck against a server answering 404 = %v, want an error naming its 404", err)
	}
	// A service that takes the connection and never answers: it gives up
	// after its 2 s, as a container health check must.
	mute, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer mute.Close()
	done, start := make(chan error, 1), time.Now()
	go func() {
		port := strconv.Itoa(mute.Addr().(*net.TCPAddr).Port)
		done <- run(t.Context(), []string{"-healthcheck"}, map[string]string{"PORT": port}, nil, io.Discard, io.Discard)
	}()
	select {
	case err := <-done:
		if took := time.Since(start); err == nil || took < 2*time.Second || took > 4*time.Second {
			t.Errorf("run -healthcheck against a service that never answers = %v after %v, want an error after 2 s", err, took)
		}
	case <-time.After(10 * time.Second): // a bound, should it wait for ever
		t.Errorf("run -healthcheck against a service that never answers still waits after 10 s, want it to give up after 2 s")
	}
	// Without PORT it asks the default port. (Something may listen there:
	// then it must have answered.)
	err = run(t.Context(), []string{"-healthcheck"}, testEnv("", nil), nil, io.Discard, io.Discard)
	if err != nil && !strings.Contains(err.Error(), "127.0.0.1:8080/healthz") {
		t.Errorf("run -healthcheck without PORT = %v, want it to ask 127.0.0.1:8080", err)
	}
}

// TestShutdownGraceRunsOut checks that a request still running when the
// drain's grace is over makes serve fail, with a warning, rather than
// pass for a clean stop.
func TestShutdownGraceRunsOut(t *testing.T) {
	t.Parallel()
	arrived, release := make(chan struct{}), make(chan struct{})
	spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		close(arrived)
		<-release
		likeSpotify(w, r, form)
	})
	defer close(release)
	cfg := testConfig(t, spotify.url, nil)
	cfg.shutdownTimeout = 50 * time.Millisecond
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var log syncBuffer
	logger := slog.New(slog.NewJSONHandler(&log, nil))
	svc := wire(cfg, logger, testSpotifyClient(cfg))
	ctx, stop := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, newHTTPServer(cfg, svc, logger), ln, svc, cfg, logger) }()
	go send(t, "POST", "http://"+ln.Addr().String()+tokenPath, noneType, "code=AQDstuck")
	<-arrived
	stop()
	if err := <-served; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("serve with a request outlasting the grace = %v, want a deadline error", err)
	}
	if !strings.Contains(log.String(), `"level":"WARN","msg":"stopped before every request had finished","in_flight":1`) ||
		strings.Contains(log.String(), `"msg":"stopped"`) {
		t.Errorf("the log does not warn that a request was cut off, or says it stopped cleanly:\n%s", log.String())
	}
}

// running is the whole program, run in this process, and its log.
type running struct {
	lines chan string // the log, a line at a time
	done  chan error  // what run returned
	stop  func()      // as SIGTERM does
	line  string      // the line next returned last
}

// startRun runs the program with env until the test ends.
func startRun(t *testing.T, env map[string]string) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	r := &running{lines: make(chan string, 100), done: make(chan error, 1), stop: cancel}
	logs, logWriter := io.Pipe()
	go func() {
		r.done <- run(ctx, nil, env, nil, io.Discard, logWriter)
		logWriter.Close()
	}()
	go func() {
		for scanner := bufio.NewScanner(logs); scanner.Scan(); {
			r.lines <- scanner.Text()
		}
		close(r.lines)
	}()
	return r
}

// next skips to the log line with the message msg, and returns its level,
// its reason and its address as a URL, where it has them.
func (r *running) next(t *testing.T, msg string) (level, reason, url string) {
	t.Helper()
	bound := time.After(10 * time.Second) // should the line never come
	for {
		select {
		case text, ok := <-r.lines:
			if !ok {
				t.Fatalf("the log ended before %q; run returned %v", msg, <-r.done)
			}
			var line struct{ Level, Msg, Reason, Addr string }
			json.Unmarshal([]byte(text), &line)
			if line.Msg == msg {
				r.line = text
				_, port, _ := net.SplitHostPort(line.Addr)
				return line.Level, line.Reason, "http://127.0.0.1:" + port
			}
		case <-bound:
			t.Fatalf("no %q in the log within 10 s", msg)
		}
	}
}

// TestRunServesUntilCancelled runs the whole program: it warns of a setting
// misspelt, listens on a free port and serves a swap, serves /metrics on its
// own port only, and once its context is done fails /healthz while it keeps
// serving for SHUTDOWN_DELAY, its log lines still flowing, then stops.
func TestRunServesUntilCancelled(t *testing.T) {
	t.Parallel()
	spotify := newFakeSpotify(t, likeSpotify)
	const delay = time.Second
	// The accounts URL with a trailing slash: the service uses, and logs, it without.
	prog := startRun(t, testEnv(spotify.url+"/", map[string]string{"PORT": "0", "METRICS_ADDR": "127.0.0.1:0", "SHUTDOWN_DELAY": delay.String(), "RATE_LIMITS": "5/min"}))
	next := func(msg string) (string, string, string) { t.Helper(); return prog.next(t, msg) }
	if level, _, _ := next("RATE_LIMITS is not a setting of this service: a typo of RATE_LIMIT?"); level != "WARN" {
		t.Errorf("the warning of a misspelt setting has level %s, want WARN", level)
	}
	_, _, metricsURL := next("serving metrics")
	_, _, serviceURL := next("listening")
	if !strings.Contains(prog.line, `"accounts_url":"`+spotify.url+`","sealing":false,"cors":false,"rate_limit":"off","trust_proxy":"0","connection_limit":256}`) {
		t.Errorf("the listening line %s does not say which features are on", prog.line)
	}
	// PORT is served on every interface, as a container needs.
	var listening struct{ Addr string }
	json.Unmarshal([]byte(prog.line), &listening)
	if host, _, _ := net.SplitHostPort(listening.Addr); !net.ParseIP(host).IsUnspecified() {
		t.Errorf("listening on %s, want every interface", listening.Addr)
	}
	// A line waits at most about 100 ms: the line of a request sent just
	// after a batch is written comes with the next batch. (The first
	// requests: no other line is waiting.)
	send(t, "GET", serviceURL+"/healthz", noneType, "")
	next("request")
	batch := time.Now()
	send(t, "GET", serviceURL+"/healthz", noneType, "")
	next("request")
	if took := time.Since(batch); took > 300*time.Millisecond {
		t.Errorf("a request's log line came %v after the last batch, want about 100 ms", took)
	}

	got := send(t, "POST", serviceURL+tokenPath, noneType, "code=AQDrun")
	if want := tokenJSON("at-AQDrun", "rt-AQDrun"); got.status != 200 || got.body != want {
		t.Errorf("POST /api/token = %d %s, want 200 %s", got.status, got.body, want)
	}
	if got := send(t, "GET", metricsURL+"/metrics", noneType, ""); got.status != 200 || !strings.Contains(got.body, `tokenswap_requests_total{handler="token",code="200"} 1`) ||
		!strings.Contains(got.body, `tokenswap_build_info{version="(devel)"} 1`) {
		t.Errorf("GET /metrics on METRICS_ADDR = %d %s, want 200, the swap counted, and the version the program says", got.status, got.body)
	}
	checkError(t, "GET /metrics on PORT", send(t, "GET", serviceURL+"/metrics", noneType, ""), 404, "not_found")

	stopped := time.Now()
	prog.stop() // as SIGTERM does
	next("stopping")
	got = send(t, "GET", serviceURL+"/healthz", noneType, "")
	if got.status != 503 || got.body != `{"status":"stopping"}` || !got.close {
		t.Errorf("GET /healthz while stopping = %d %s, Connection: close %v; want 503 {\"status\":\"stopping\"}, closing", got.status, got.body, got.close)
	}
	// The health check's line, written out during the delay: no failure.
	if level, reason, _ := next("request"); reason != "the service is stopping" || level != "INFO" {
		t.Errorf("the 503 of /healthz while stopping is logged at %s with the reason %q, want INFO, the service is stopping", level, reason)
	}
	if took := time.Since(stopped); took >= delay {
		t.Errorf("a request's log line came %v after SIGTERM, want it within the %v delay: lines must flow until the end", took, delay)
	}
	next("draining")
	next("stopped")
	if err := <-prog.done; err != nil {
		t.Errorf("run after cancel = %v, want nil", err)
	}
	if took := time.Since(stopped); took < delay {
		t.Errorf("run returned %v after SIGTERM, want it to serve for SHUTDOWN_DELAY=%v first", took, delay)
	}
}

// TestRunLimitsItsListeners runs the whole program with CONNECTION_LIMIT=2:
// on its own port a third connection from one address is closed unanswered
// where the TCP peer is the client, not behind a count of proxies; on the
// metrics port always; both listeners cut off a client that sends half its
// headers, and the metrics listener refuses 16 KiB of headers, as the
// service's does.
func TestRunLimitsItsListeners(t *testing.T) {
	t.Parallel()
	spotify := newFakeSpotify(t, likeSpotify)
	// served dials addr from 127.0.0.1 and reports whether a request there
	// is answered; a connection over the cap sees it closed at once.
	served := func(t *testing.T, url string) bool {
		t.Helper()
		conn, err := net.Dial("tcp", strings.TrimPrefix(url, "http://"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
		answer := make([]byte, 12)
		n, err := io.ReadFull(conn, answer)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("a connection to %s neither answered nor closed within 5 s", url)
		}
		return n == len(answer)
	}
	for _, trust := range []string{"0", "1"} {
		t.Run("TRUST_PROXY="+trust, func(t *testing.T) {
			t.Parallel()
			prog := startRun(t, testEnv(spotify.url, map[string]string{"PORT": "0", "METRICS_ADDR": "127.0.0.1:0", "CONNECTION_LIMIT": "2", "TRUST_PROXY": trust,
				"ENCRYPTION_SECRET": testSecret, "CORS_ALLOWED_ORIGINS": "https://app.example.com", "RATE_LIMIT": "5/min"}))
			_, _, metricsURL := prog.next(t, "serving metrics")
			_, _, serviceURL := prog.next(t, "listening")
			if want := `"sealing":true,"cors":true,"rate_limit":"5/min","trust_proxy":"` + trust + `","connection_limit":2}`; !strings.Contains(prog.line, want) {
				t.Errorf("the listening line %s does not end %s", prog.line, want)
			}
			for _, url := range []string{serviceURL, metricsURL} {
				capped := url == metricsURL || trust == "0"
				first, second, third := served(t, url), served(t, url), served(t, url)
				if !first || !second || third == capped {
					t.Errorf("%s, CONNECTION_LIMIT=2: served %v, %v, %v; want 2 connections served and a 3rd %s", url, first, second, third, map[bool]string{true: "closed", false: "served"}[capped])
				}
			}
			if trust == "1" {
				// Both listeners cut off a client that sends half its
				// headers, at the 5 s header limit.
				var wg sync.WaitGroup
				for _, url := range []string{serviceURL, metricsURL} {
					wg.Add(1)
					go func() {
						defer wg.Done()
						conn, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}}).Dial("tcp", strings.TrimPrefix(url, "http://"))
						if err != nil {
							t.Error(err)
							return
						}
						defer conn.Close()
						conn.SetDeadline(time.Now().Add(10 * time.Second))
						io.WriteString(conn, "GET /healthz HTTP/1.1\r\nHost: x\r\n")
						if _, err := io.Copy(io.Discard, conn); err != nil {
							t.Errorf("%s: a client that sends half its headers is still connected after 10 s (%v), want it cut off after 5 s", url, err)
						}
					}()
				}
				wg.Wait()
				return
			}
			req, _ := http.NewRequest("GET", metricsURL+"/metrics", nil)
			req.Header.Set("X-Padding", strings.Repeat("p", 16<<10))
			req.Close = true
			// From another address: 127.0.0.1 holds its two already.
			client := &http.Client{Transport: &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}}).DialContext}}
			if resp, err := client.Do(req); err != nil || resp.StatusCode != 431 {
				t.Errorf("GET /metrics with 16 KiB of headers = %v, %v; want 431, the server's limits", resp, err)
			}
		})
	}
}

// TestRollingDeployDropsNothing runs keep-alive clients through a SIGTERM
// with SHUTDOWN_DELAY, as a load balancer sees it: an answer that closes its
// connection sends the client to the other replica, and no request fails.
func TestRollingDeployDropsNothing(t *testing.T) {
	t.Parallel()
	spotify := newFakeSpotify(t, likeSpotify)
	cfg := testConfig(t, spotify.url, map[string]string{"SHUTDOWN_DELAY": "1s"})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.DiscardHandler)
	old := wire(cfg, logger, testSpotifyClient(cfg))
	ctx, sigterm := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, newHTTPServer(cfg, old, logger), ln, old, cfg, logger) }()
	replacement := startService(t, likeSpotify, nil)

	const clients, before, after = 20, 5, 5
	var warm, failures, closed atomic.Int64
	allWarm := make(chan struct{})
	var wg sync.WaitGroup
	for i := range clients {
		wg.Add(1)
		go func() {
			defer wg.Done()
			client := &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1}}
			defer client.CloseIdleConnections()
			target, n := "http://"+ln.Addr().String(), 0
			for left := after; left > 0; n++ {
				code := fmt.Sprintf("AQDclient%d-%d", i, n)
				resp, err := client.Post(target+tokenPath, formType, strings.NewReader("code="+code))
				if err != nil {
					failures.Add(1)
					t.Errorf("client %d, request %d: %v", i, n, err)
					return
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if want := tokenJSON("at-"+code, "rt-"+code); resp.StatusCode != 200 || string(body) != want {
					failures.Add(1)
					t.Errorf("client %d, request %d = %d %s, want 200 %s", i, n, resp.StatusCode, body, want)
				}
				switch {
				case n+1 == before && warm.Add(1) == clients:
					close(allWarm)
				case target == replacement.url:
					left--
				case resp.Close: // Connection: close: the balancer moves us
					closed.Add(1)
					target = replacement.url
				}
			}
		}()
	}
	<-allWarm
	sigterm()
	wg.Wait()
	if err := <-served; err != nil {
		t.Errorf("serve = %v, want nil", err)
	}
	if failures.Load() != 0 || closed.Load() != clients {
		t.Errorf("%d requests failed and %d of %d clients were told to leave; want none failed, all told", failures.Load(), closed.Load(), clients)
	}
}

// TestShutdownLetsRequestsFinish stops the server while a swap waits for
// Spotify, and checks that the swap still gets its answer.
func TestShutdownLetsRequestsFinish(t *testing.T) {
	t.Parallel()
	arrived, release := make(chan struct{}), make(chan struct{})
	spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		close(arrived)
		<-release
		likeSpotify(w, r, form)
	})
	cfg := testConfig(t, spotify.url, nil)
	cfg.shutdownTimeout = 5 * time.Second // under the 10 s read limit: the drain's grace is this, whatever makes it up
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var log syncBuffer
	logger := slog.New(slog.NewJSONHandler(&log, nil))
	svc := wire(cfg, logger, testSpotifyClient(cfg))
	srv := newHTTPServer(cfg, svc, logger)
	shuttingDown := make(chan struct{})
	srv.RegisterOnShutdown(func() { close(shuttingDown) })
	ctx, stop := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, srv, ln, svc, cfg, logger) }()

	answered := make(chan reply, 1)
	go func() {
		answered <- send(t, "POST", "http://"+ln.Addr().String()+tokenPath, noneType, "code=AQDinflight")
	}()
	<-arrived
	stop() // as SIGTERM does
	<-shuttingDown
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Errorf("the server still accepts connections while shutting down")
	}
	if strings.Contains(log.String(), `"msg":"stopped"`) {
		t.Errorf("the log says stopped while a request is still in flight:\n%s", log.String())
	}
	close(release)
	if got, want := <-answered, tokenJSON("at-AQDinflight", "rt-AQDinflight"); got.status != 200 || got.body != want {
		t.Errorf("in-flight POST /api/token = %d %s, want 200 %s", got.status, got.body, want)
	}
	if err := <-served; err != nil {
		t.Errorf("serve = %v, want nil after a graceful shutdown", err)
	}
	for _, want := range []string{`"msg":"stopping","in_flight":1,`, `"msg":"stopped"`} {
		if !strings.Contains(log.String(), want) {
			t.Errorf("the log does not hold %s:\n%s", want, log.String())
		}
	}
	if strings.Contains(log.String(), `"msg":"draining"`) {
		t.Errorf("without SHUTDOWN_DELAY the log says draining, which marks the delay's end:\n%s", log.String())
	}
}

// TestDrainOutlastsASlowRequest stops the service while a request is still
// sending its body, which Spotify then takes its time to answer: the drain
// waits for the whole of it, the 10 s read limit plus SPOTIFY_TIMEOUT, and
// the client gets Spotify's answer.
func TestDrainOutlastsASlowRequest(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("11 s of real time; TestLoadConfig pins the drain's length")
	}
	spotify := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		time.Sleep(1500 * time.Millisecond) // a slow Spotify, not a synchronisation
		likeSpotify(w, r, form)
	})
	cfg := testConfig(t, spotify.url, map[string]string{"SPOTIFY_TIMEOUT": "3s"}) // a drain of 14 s
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	logger := slog.New(slog.DiscardHandler)
	svc := wire(cfg, logger, testSpotifyClient(cfg))
	srv := newHTTPServer(cfg, svc, logger)
	active := make(chan struct{})
	srv.ConnState = func(_ net.Conn, state http.ConnState) {
		if state == http.StateActive {
			close(active)
		}
	}
	ctx, stop := context.WithCancel(t.Context())
	served := make(chan error, 1)
	go func() { served <- serve(ctx, srv, ln, svc, cfg, logger) }()
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	body := "code=AQDslowly"
	fmt.Fprintf(conn, "POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", len(body))
	<-active
	stop() // SIGTERM, the body still to come: 9 s of it, then 1.5 s of Spotify's
	for i := range body {
		time.Sleep(9 * time.Second / time.Duration(len(body)))
		io.WriteString(conn, body[i:i+1])
	}
	answer, _ := io.ReadAll(conn)
	if !strings.HasPrefix(string(answer), "HTTP/1.1 200 OK") || !strings.HasSuffix(string(answer), tokenJSON("at-AQDslowly", "rt-AQDslowly")) {
		t.Errorf("a request that outlasts SPOTIFY_TIMEOUT and the default 10 s grace, within its read limit and SPOTIFY_TIMEOUT: %q, want Spotify's answer", answer)
	}
	if err := <-served; err != nil {
		t.Errorf("serve = %v, want nil: the drain is as long as a request may take", err)
	}
}

// startHTTPServer serves the service on loopback with the server's limits
// of cfg, as run does.
func startHTTPServer(t *testing.T, cfg config) *httptest.Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	srv.Config = newHTTPServer(cfg, wire(cfg, slog.New(slog.DiscardHandler), testSpotifyClient(cfg)), slog.New(slog.DiscardHandler))
	srv.Start()
	t.Cleanup(srv.Close)
	return srv
}

// TestSlowClientsAreCutOff checks that clients which send their headers byte
// by byte, or never finish them, are disconnected within the header timeout,
// and a body never finished within the read timeout, while other clients
// are served.
func TestSlowClientsAreCutOff(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "http://127.0.0.1:9", nil)
	// A read timeout far above the test's bounds: the header timeout alone
	// must cut the headers off.
	cfg.readHeaderTimeout, cfg.readTimeout = 300*time.Millisecond, time.Minute
	headers := startHTTPServer(t, cfg)
	cfg.readTimeout = 600 * time.Millisecond
	body := startHTTPServer(t, cfg)

	dial := func(srv *httptest.Server, first string) net.Conn {
		conn, err := net.Dial("tcp", srv.Listener.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(10 * time.Second)) // the test's own bound
		if _, err := io.WriteString(conn, first); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	// closedAfter waits until the server closes conn and says how long it took.
	closedAfter := func(conn net.Conn, start time.Time) (time.Duration, string) {
		b, err := io.ReadAll(conn)
		if err != nil && !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "reset") {
			t.Errorf("reading from the slow connection: %v, want the server to close it", err)
		}
		return time.Since(start), string(b)
	}

	start := time.Now()
	dribbling := dial(headers, "POST /api/token HTTP/1.1\r\nHost: x\r\n")
	go func() { // one byte of a never-ending header every 20 ms
		tick := time.NewTicker(20 * time.Millisecond)
		defer tick.Stop()
		for range tick.C {
			if _, err := dribbling.Write([]byte("X")); err != nil {
				return
			}
		}
	}()
	stalled := dial(headers, "POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Ty")
	slowBody := dial(body, "POST /api/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ncode=")

	if got := send(t, "GET", headers.URL+"/healthz", noneType, ""); got.status != 200 {
		t.Errorf("GET /healthz while slow clients hang on = %d, want 200", got.status)
	}
	for name, conn := range map[string]net.Conn{"headers byte by byte": dribbling, "headers never finished": stalled} {
		// Go's server, not the handler, may say 400 before it hangs up.
		if took, got := closedAfter(conn, start); took > 5*time.Second || got != "" && !strings.HasPrefix(got, "HTTP/1.1 400 ") {
			t.Errorf("%s: closed after %v with %q, want closed within the header timeout", name, took, got)
		}
	}
	took, got := closedAfter(slowBody, start)
	if took > 5*time.Second || !strings.HasPrefix(got, "HTTP/1.1 400") || !strings.Contains(got, `"error":"invalid_request"`) {
		t.Errorf("body never finished: closed after %v with %q, want a 400 JSON answer within the read timeout", took, got)
	}
}

// TestServerLimits checks the limits run gives the server: oversized
// headers are refused, and an answer may wait for a whole call to Spotify.
func TestServerLimits(t *testing.T) {
	t.Parallel()
	cfg := testConfig(t, "http://127.0.0.1:9", map[string]string{"SPOTIFY_TIMEOUT": "30s"})
	srv := startHTTPServer(t, cfg)
	// 16 KiB of headers in all, the request line included, on a new
	// connection (on a kept-alive one, net/http may read ahead a little).
	for size, want := range map[int]int{16<<10 - 256: 200, 16 << 10: 431} {
		got := send(t, "GET", srv.URL+"/healthz", noneType, "", "X-Padding", strings.Repeat("p", size), "Connection", "close")
		if got.status != want {
			t.Errorf("GET /healthz with a %d KiB header = %d, want %d", size>>10, got.status, want)
		}
	}
	// What net/http itself reports (a handler's panic, an accept error)
	// goes to the service's log, as a JSON line.
	var log syncBuffer
	newHTTPServer(cfg, nil, slog.New(slog.NewJSONHandler(&log, nil))).ErrorLog.Print("http: Accept error: too many open files")
	if !strings.Contains(log.String(), `"level":"WARN","msg":"http: Accept error: too many open files"`) {
		t.Errorf("the server's own error log wrote %q, want a JSON WARN line", log.String())
	}
	// With SPOTIFY_TIMEOUT=30s, a 20 s answer from Spotify must still reach
	// the client: the write timeout starts when the request is read.
	if w := srv.Config.WriteTimeout; w < cfg.readTimeout+cfg.spotifyTimeout {
		t.Errorf("WriteTimeout = %v with SPOTIFY_TIMEOUT=30s, want at least the read timeout plus 30s", w)
	}
	if srv.Config.ReadHeaderTimeout != 5*time.Second || srv.Config.ReadTimeout != 10*time.Second || srv.Config.IdleTimeout != 60*time.Second {
		t.Errorf("server timeouts: header %v, read %v, idle %v; want 5s, 10s, 60s",
			srv.Config.ReadHeaderTimeout, srv.Config.ReadTimeout, srv.Config.IdleTimeout)
	}
}

// TestEnvExample checks .env.example against loadConfig: its required
// values are refused until filled in, and so is its ENCRYPTION_SECRET once
// uncommented.
func TestEnvExample(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(".env.example")
	if err != nil {
		t.Fatal(err)
	}
	asIs, err := godotenv.Unmarshal(string(b))
	if err != nil {
		t.Fatalf(".env.example does not parse: %v", err)
	}
	_, err = loadConfig(asIs, nil)
	for _, name := range []string{"SPOTIFY_CLIENT_ID", "SPOTIFY_CLIENT_SECRET", "SPOTIFY_CLIENT_CALLBACK_URL"} {
		if err == nil || !strings.Contains(err.Error(), name+" is still the placeholder") {
			t.Errorf("loadConfig(.env.example as is) = %v, want %s refused as a placeholder", err, name)
		}
	}
	// Every name the code reads is a setting, which -h and the look-alike
	// warnings go by.
	code, err := os.ReadFile("main.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`(?:get\(|env\[)"([A-Z_]+)"`).FindAllSubmatch(code, -1) {
		if !slices.ContainsFunc(settingsTable(), func(s setting) bool { return s.name == string(m[1]) }) {
			t.Errorf("main.go reads %s, which settingsTable does not list", m[1])
		}
	}

	uncommented, err := godotenv.Unmarshal(regexp.MustCompile(`(?m)^# ([A-Z_]+=)`).ReplaceAllString(string(b), "$1"))
	if err != nil {
		t.Fatal(err)
	}
	uncommented["SPOTIFY_CLIENT_ID"], uncommented["SPOTIFY_CLIENT_SECRET"], uncommented["SPOTIFY_CLIENT_CALLBACK_URL"] = "id", "secret", "myapp://cb"
	_, err = loadConfig(uncommented, nil)
	if err == nil || err.Error() != "ENCRYPTION_SECRET is still the placeholder from .env.example" {
		t.Errorf("loadConfig(.env.example filled in, all uncommented) = %v, want only ENCRYPTION_SECRET refused", err)
	}
}

// TestSettingsAgree checks that -h, README.md's settings table and
// .env.example give every setting with the same default and meaning.
func TestSettingsAgree(t *testing.T) {
	t.Parallel()
	var help strings.Builder
	if err := run(t.Context(), []string{"-h"}, nil, nil, &help, io.Discard); err != nil {
		t.Fatalf("run -h: %v", err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	example, err := os.ReadFile(".env.example")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range settingsTable() {
		line := regexp.MustCompile(`(?m)^  ` + s.name + ` +(\S+) +(.*)$`).FindStringSubmatch(help.String())
		if line == nil || line[1] != s.def || line[2] != s.meaning {
			t.Errorf("-h line of %s = %q, want its default %q and meaning %q", s.name, line, s.def, s.meaning)
		}
		def := "`" + s.def + "`"
		if s.def == "required" || s.def == "off" {
			def = s.def
		}
		if row := "| `" + s.name + "` | " + def + " | " + s.meaning + " |"; !strings.Contains(string(readme), row+"\n") {
			t.Errorf("README.md's settings table has no row %s", row)
		}
		// In .env.example, the meaning is the comment above the variable
		// (or above a note on it), which is set (required) or shown
		// commented out with its default.
		entry := regexp.MustCompile(`(?m)^# (.*)\n(?:# [A-Z].*\n)?^(?:# )?` + s.name + `=(.*)$`).FindSubmatch(example)
		switch {
		case entry == nil || string(entry[1]) != s.meaning:
			t.Errorf(".env.example does not say above %s: # %s", s.name, s.meaning)
		case s.def != "required" && s.def != "off" && string(entry[2]) != s.def:
			t.Errorf(".env.example shows %s=%s, want its default %s", s.name, entry[2], s.def)
		}
	}
}

// TestDockerignore checks that secrets and history stay out of the image's
// build context.
func TestDockerignore(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile(".dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Fields(string(b))
	for _, want := range []string{".env", ".git"} {
		if !slices.Contains(lines, want) {
			t.Errorf(".dockerignore does not list %s", want)
		}
	}
}

// TestLogBuffer checks that log lines wait in the buffer, that a full
// buffer and flushEvery write them out without being asked, and that a failed
// write does not stop logging.
func TestLogBuffer(t *testing.T) {
	t.Parallel()
	var out syncBuffer
	logs := &logBuffer{out: &out}
	io.WriteString(logs, "line 1\n")
	if got := out.String(); got != "" {
		t.Errorf("before a flush the log holds %q, want nothing yet", got)
	}
	logs.flush()
	if got := out.String(); got != "line 1\n" {
		t.Errorf("after a flush the log holds %q, want line 1", got)
	}
	long := strings.Repeat("x", logBufferSize/2) + "\n"
	for range 3 {
		io.WriteString(logs, long)
	}
	if got := len(out.String()); got != len("line 1\n")+2*len(long) {
		t.Errorf("after three half-buffer lines the output has %d bytes, want line 1 and two of them", got)
	}

	failing := &failingWriter{fails: 1}
	logs = &logBuffer{out: failing}
	io.WriteString(logs, "lost\n")
	logs.flush() // fails
	io.WriteString(logs, "line 2\n")
	logs.flush()
	if got := failing.String(); got != "line 2\n" {
		t.Errorf("after a failed write the log holds %q, want line 2: a failed write must not stop logging", got)
	}

	pipeOut, pipeIn := io.Pipe()
	logs = &logBuffer{out: pipeIn}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	go logs.flushEvery(ctx, time.Millisecond)
	io.WriteString(logs, "line 3\n")
	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(pipeOut).ReadString('\n')
		line <- s
	}()
	select {
	case got := <-line:
		if got != "line 3\n" {
			t.Errorf("flushEvery wrote %q, want line 3", got)
		}
	case <-time.After(10 * time.Second): // a bound, should it never flush
		t.Errorf("flushEvery wrote nothing in 10 s")
	}
}

// failingWriter fails its first writes, as a full disk or a closed pipe
// does, then takes them.
type failingWriter struct {
	fails int
	syncBuffer
}

func (w *failingWriter) Write(p []byte) (int, error) {
	if w.fails > 0 {
		w.fails--
		return 0, errors.New("no space left on device")
	}
	return w.syncBuffer.Write(p)
}

// TestMain lets a test run the program itself, main and all: with
// TOKENSWAP_TEST_MAIN=1 in its environment the test binary is the service.
func TestMain(m *testing.M) {
	if os.Getenv("TOKENSWAP_TEST_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestMainExitStatus runs the program in a directory of its own, with only
// the environment given, and checks its exit status and what it says.
func TestMainExitStatus(t *testing.T) {
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	spotify := newFakeSpotify(t, likeSpotify)
	refusing := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		spotifyError(w, 400, "invalid_client", "Invalid client secret")
	})
	failing := newFakeSpotify(t, func(w http.ResponseWriter, r *http.Request, form url.Values) {
		spotifyError(w, 500, "server_error", "Internal error")
	})
	_, port, _ := net.SplitHostPort(refusedAddr(t))
	closedPort := "PORT=" + port
	taken, err := net.Listen("tcp", ":0") // a port something else holds
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { taken.Close() }) // after the parallel subtests
	example, err := os.ReadFile(".env.example")
	if err != nil {
		t.Fatal(err)
	}
	credentials := "SPOTIFY_CLIENT_ID=" + testClientID + "\nSPOTIFY_CLIENT_SECRET='" + testClientSecret + "'\nSPOTIFY_CLIENT_CALLBACK_URL=" + testCallback + "\n"
	tests := []struct {
		name       string
		dotenv     string // "" for no .env
		env        []string
		args       []string
		wantStatus int
		wantOut    []string // each in stdout and stderr together
		notWant    []string
	}{
		{name: "nothing set, no .env", wantStatus: 2,
			wantOut: []string{"SPOTIFY_CLIENT_ID is not set", "SPOTIFY_CLIENT_SECRET is not set", "no .env file in DIR, the working directory"}},
		{name: ".env.example copied, not filled in", dotenv: string(example), wantStatus: 2,
			wantOut: []string{"SPOTIFY_CLIENT_ID is still the placeholder"}, notWant: []string{"no .env file"}},
		{name: "the environment's empty secret hides .env's", dotenv: credentials, env: []string{"SPOTIFY_CLIENT_SECRET="}, wantStatus: 2,
			wantOut: []string{"SPOTIFY_CLIENT_SECRET is empty in the environment, which hides the value that .env gives it"}},
		{name: "METRICS_ADDR's port already taken: no fault of the settings", dotenv: credentials,
			env: []string{"METRICS_ADDR=:" + strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)}, wantStatus: 1, wantOut: []string{"listen on METRICS_ADDR: "}},
		{name: "a .env without the secret: no word of a missing .env", dotenv: "SPOTIFY_CLIENT_ID=id\nSPOTIFY_CLIENT_CALLBACK_URL=myapp://cb\n", wantStatus: 2,
			wantOut: []string{"SPOTIFY_CLIENT_SECRET is not set"}, notWant: []string{"no .env file"}},
		{name: "the secret under a misspelt name", env: []string{"SPOTIFY_CLIENT_ID=id", "SPOTIFY_CLIENT_SECERT=value-not-to-show", "SPOTIFY_CLIENT_CALLBACK_URL=myapp://cb"}, wantStatus: 2,
			wantOut: []string{"SPOTIFY_CLIENT_SECRET is not set", "SPOTIFY_CLIENT_SECERT is not a setting of this service: a typo of SPOTIFY_CLIENT_SECRET?"},
			notWant: []string{"value-not-to-show"}},
		// The usage once, the flags described, and not the flag package's own.
		{name: "a bad flag", args: []string{"-verbose"}, wantStatus: 2, wantOut: []string{"Usage:", "-check", "exit 0 if the service on 127.0.0.1:$PORT answers /healthz"},
			notWant: []string{"Usage of"}},
		{name: "help", args: []string{"-h"}, wantStatus: 0,
			wantOut: []string{"Without a flag it serves", ".env in the working", "RATE_LIMIT", "METRICS_ADDR", "SPOTIFY_CLIENT_CALLBACK_URL", "-healthcheck",
				"print the version and exit"},
			notWant: []string{"Usage of"}},
		{name: "version", args: []string{"-version"}, wantStatus: 0, wantOut: []string{"(devel)"}}, // the test binary has no module version
		{name: "check: .env read, the environment wins over it", dotenv: credentials + "SPOTIFY_ACCOUNTS_URL=" + refusing.url + "\n",
			env: []string{"SPOTIFY_ACCOUNTS_URL=" + spotify.url}, args: []string{"-check"}, wantStatus: 0,
			wantOut: []string{"ok: credentials accepted by " + spotify.url}},
		{name: "check: a misspelt setting is warned of", dotenv: credentials + "CORS_ALLOWED_ORIGIN=https://app.example.com\n",
			env: []string{"SPOTIFY_ACCOUNTS_URL=" + spotify.url}, args: []string{"-check"}, wantStatus: 0,
			wantOut: []string{"warning: CORS_ALLOWED_ORIGIN is not a setting of this service: a typo of CORS_ALLOWED_ORIGINS?", "ok: credentials accepted"}},
		{name: "check: credentials refused", dotenv: credentials, env: []string{"SPOTIFY_ACCOUNTS_URL=" + refusing.url}, args: []string{"-check"}, wantStatus: 1,
			wantOut: []string{"invalid_client: Invalid client secret"}, notWant: []string{testClientSecret}},
		{name: "check: Spotify failing is no success", dotenv: credentials, env: []string{"SPOTIFY_ACCOUNTS_URL=" + failing.url}, args: []string{"-check"}, wantStatus: 1,
			wantOut: []string{"answered 500: server_error"}, notWant: []string{"ok:"}},
		{name: "a port already taken: no fault of the settings", dotenv: credentials, env: []string{"PORT=" + strconv.Itoa(taken.Addr().(*net.TCPAddr).Port)}, wantStatus: 1,
			wantOut: []string{"listen: "}},
		{name: "healthcheck: nothing listens", env: []string{closedPort}, args: []string{"-healthcheck"}, wantStatus: 1, wantOut: []string{"healthcheck:"}},
		{name: "healthcheck: PORT is no port", env: []string{"PORT=http"}, args: []string{"-healthcheck"}, wantStatus: 2, wantOut: []string{`PORT: "http"`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if tt.dotenv != "" {
				if err := os.WriteFile(filepath.Join(dir, ".env"), []byte(tt.dotenv), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			cmd := exec.Command(self, tt.args...)
			cmd.Dir = dir
			cmd.Env = append([]string{"TOKENSWAP_TEST_MAIN=1", "PORT=0"}, tt.env...)
			var stdout, stderr strings.Builder
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			out, status := stdout.String()+stderr.String(), cmd.ProcessState.ExitCode()
			if err != nil && status < 0 {
				t.Fatalf("running the program: %v", err)
			}
			if status != tt.wantStatus {
				t.Errorf("exit status %d, want %d; it said:\n%s", status, tt.wantStatus, out)
			}
			if status != 0 && stdout.Len() > 0 {
				t.Errorf("exit status %d, and on stdout %q: a failure goes to stderr", status, stdout.String())
			}
			for _, want := range tt.wantOut {
				if want = strings.ReplaceAll(want, "DIR", dir); !strings.Contains(out, want) {
					t.Errorf("it said:\n%s\nwant %q in it", out, want)
				}
			}
			for _, notWant := range tt.notWant {
				if strings.Contains(out, notWant) {
					t.Errorf("it said:\n%s\nwhich holds %q", out, notWant)
				}
			}
		})
	}
}

// TestMainSignals runs the program and signals it as a platform does: one
// SIGTERM stops it cleanly, exit 0; a second one, during a long
// SHUTDOWN_DELAY, stops it at once.
func TestMainSignals(t *testing.T) {
	t.Parallel()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		delay    string
		signal   syscall.Signal
		signals  int
		wantExit int
	}{
		{"0s", syscall.SIGTERM, 1, 0},
		{"0s", syscall.SIGINT, 1, 0},   // as Fly.io sends by default
		{"1h", syscall.SIGTERM, 2, -1}, // killed by the signal
	} {
		cmd := exec.Command(self)
		cmd.Dir = t.TempDir()
		cmd.Env = []string{"TOKENSWAP_TEST_MAIN=1", "PORT=0", "SHUTDOWN_DELAY=" + tt.delay,
			"SPOTIFY_CLIENT_ID=id", "SPOTIFY_CLIENT_SECRET=secret", "SPOTIFY_CLIENT_CALLBACK_URL=myapp://cb"}
		stderr, err := cmd.StderrPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := bufio.NewScanner(stderr)
		waitFor := func(msg string) {
			t.Helper()
			for lines.Scan() {
				if strings.Contains(lines.Text(), `"msg":"`+msg+`"`) {
					return
				}
			}
			t.Fatalf("SHUTDOWN_DELAY=%s: the program ended before logging %q", tt.delay, msg)
		}
		waitFor("listening")
		cmd.Process.Signal(tt.signal)
		if tt.signals == 2 {
			waitFor("stopping")
			cmd.Process.Signal(tt.signal)
		}
		go io.Copy(io.Discard, stderr)
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(20 * time.Second): // a bound, should it hang on
			cmd.Process.Kill()
			t.Fatalf("SHUTDOWN_DELAY=%s: still running 20 s after %d %v", tt.delay, tt.signals, tt.signal)
		}
		if got := cmd.ProcessState.ExitCode(); got != tt.wantExit {
			t.Errorf("SHUTDOWN_DELAY=%s, %d %v: exit status %d, want %d", tt.delay, tt.signals, tt.signal, got, tt.wantExit)
		}
	}
}
