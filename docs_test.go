package main

import (
	"os"
	"path"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// TestDocs checks what a reader of a fresh clone relies on: a README short
// enough to read in ten minutes, links and anchors between the documents
// that resolve, and no path that reaches outside the repository.
func TestDocs(t *testing.T) {
	t.Parallel()
	pages, err := filepath.Glob("docs/*.md")
	if err != nil || len(pages) == 0 {
		t.Fatalf("no docs/*.md: %v", err)
	}
	pages = append(pages, "README.md")
	text := map[string]string{}
	for _, p := range pages {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		text[p] = string(b)
	}
	if n := strings.Count(text["README.md"], "\n"); n > 400 {
		t.Errorf("README.md has %d lines, want at most 400: the reference belongs in docs/", n)
	}
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	relative := regexp.MustCompile("(?:^|[\\s(`\"'=])((?:\\./)?(?:\\.\\./)+[^\\s)`\"']*)")
	for _, p := range pages {
		dir := path.Dir(p)
		for _, m := range relative.FindAllStringSubmatch(text[p], -1) {
			if to := path.Join(dir, m[1]); strings.HasPrefix(to, "..") {
				t.Errorf("%s names %s, outside the repository", p, m[1])
			}
		}
		for _, outside := range []string{"shared/", "/work/"} {
			if strings.Contains(text[p], outside) {
				t.Errorf("%s names %s, which a clone does not have", p, outside)
			}
		}
		for _, m := range link.FindAllStringSubmatch(text[p], -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file, anchor, _ := strings.Cut(target, "#")
			to := p
			if file != "" {
				to = path.Join(dir, file)
				if _, err := os.Stat(to); err != nil {
					t.Errorf("%s links to %s, which does not exist", p, target)
					continue
				}
			}
			if anchor != "" && !hasAnchor(text[to], anchor) {
				t.Errorf("%s links to %s, but %s has no heading #%s", p, target, to, anchor)
			}
		}
	}
}

// hasAnchor reports whether markdown has a heading whose GitHub anchor is
// anchor: lower case, spaces as hyphens, other punctuation dropped.
func hasAnchor(markdown, anchor string) bool {
	fenced := false
	for _, line := range strings.Split(markdown, "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
		}
		heading, ok := strings.CutPrefix(strings.TrimLeft(line, "#"), " ")
		if fenced || !ok || !strings.HasPrefix(line, "#") {
			continue
		}
		slug := strings.Map(func(r rune) rune {
			switch {
			case r == ' ':
				return '-'
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
				return unicode.ToLower(r)
			}
			return -1
		}, heading)
		if slug == anchor {
			return true
		}
	}
	return false
}
