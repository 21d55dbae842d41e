// Command fakespotify plays Spotify's accounts service on this machine, so
// that spotify-token-swap can be tried, and checked, without a Spotify app:
//
//	go run ./testdata/fakespotify
//
// It listens on 127.0.0.1:9999 (-addr to change it) until stopped, prints
// the address it listens on, and answers POST /api/token for the client ID
// fake-client-id with the secret fake-client-secret: the code "used" with
// Spotify's invalid_grant, any other code with tokens named after it
// (at-CODE, rt-CODE), a refresh token with an access token named after it.
package main

import (
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:9999", "the address to listen on")
	flag.Parse()
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakespotify:", err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr())
	err = http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		answer := func(status int, body string, args ...any) {
			w.WriteHeader(status)
			fmt.Fprintf(w, body, args...)
		}
		user, pass, _ := r.BasicAuth()
		if r.Method != http.MethodPost || r.URL.Path != "/api/token" || user != "fake-client-id" || pass != "fake-client-secret" {
			answer(http.StatusBadRequest, `{"error":"invalid_client","error_description":"Invalid client"}`)
			return
		}
		r.ParseForm()
		switch code := r.PostForm.Get("code"); r.PostForm.Get("grant_type") {
		case "authorization_code":
			if code == "used" {
				answer(http.StatusBadRequest, `{"error":"invalid_grant","error_description":"Invalid authorization code"}`)
				return
			}
			answer(http.StatusOK, `{"access_token":"at-%s","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-%[1]s"}`, code)
		case "refresh_token":
			answer(http.StatusOK, `{"access_token":"at-from-%s","token_type":"Bearer","expires_in":3600}`, r.PostForm.Get("refresh_token"))
		case "client_credentials":
			answer(http.StatusOK, `{"access_token":"app","token_type":"Bearer","expires_in":3600}`)
		default:
			answer(http.StatusBadRequest, `{"error":"unsupported_grant_type","error_description":"grant_type parameter is missing"}`)
		}
	}))
	fmt.Fprintln(os.Stderr, "fakespotify:", err)
	os.Exit(1)
}
