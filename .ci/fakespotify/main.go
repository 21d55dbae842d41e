// Command fakespotify plays Spotify's token endpoint for .ci/run, which
// checks the binary and the container image against it. It prints the
// address it listens on, answers POST /api/token for the client
// ci:ci-secret with tokens named after the code, and exits after ten
// minutes, so that a failed run leaves nothing behind.
package main

import (
	"fmt"
	"net"
	"net/http"
	"os"
	"time"
)

func main() {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println(ln.Addr())
	time.AfterFunc(10*time.Minute, func() { os.Exit(0) })
	http.Serve(ln, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		user, pass, _ := r.BasicAuth()
		if r.Method != http.MethodPost || r.URL.Path != "/api/token" || user != "ci" || pass != "ci-secret" {
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprint(w, `{"error":"invalid_client","error_description":"Invalid client"}`)
			return
		}
		r.ParseForm()
		switch r.PostForm.Get("grant_type") {
		case "authorization_code":
			fmt.Fprintf(w, `{"access_token":"at-%s","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-%[1]s"}`, r.PostForm.Get("code"))
		case "refresh_token":
			fmt.Fprintf(w, `{"access_token":"at-from-%s","token_type":"Bearer","expires_in":3600}`, r.PostForm.Get("refresh_token"))
		case "client_credentials":
			fmt.Fprint(w, `{"access_token":"app","token_type":"Bearer","expires_in":3600}`)
		default:
			w.WriteHeader(http.StatusBadRequest)
			fmt.Fprint(w, `{"error":"unsupported_grant_type","error_description":"grant_type parameter is missing"}`)
		}
	}))
}
