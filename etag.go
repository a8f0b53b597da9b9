package main

// ETags: how a client names the exact state of a listing it has seen, and
// the conditional requests that use the name.
//
// The tag is the version and the region that wrote it, "4-us", and never the
// version alone. Until the regions have exchanged their events, the same
// version number can name two different writes: US's version 4 and EU's
// version 4 of one listing, of which the conflict rule will keep one. A
// client that read EU's version 4 and sends If-Match: "4" would overwrite
// US's version 4, a state it never saw, once that one wins; If-Match: "4-eu"
// is refused instead.
//
//   - GET answers with ETag, and with 304 and no body when If-None-Match
//     names the current state (the client's copy is still good).
//   - PUT answers with the new state's ETag. With If-Match, the update
//     happens only if the header names the current state, else 412: on top
//     of the body's version, which stays as the seed has it (409).
//   - DELETE requires If-Match (428 without it): a delete has no body to
//     carry a version, and deleting a state the client never saw is the
//     lost update at its worst. 412 when it names another state.

import (
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
)

// etag is the strong entity tag of a state of a listing: its version and the
// region that wrote it, quoted, as in "4-us".
func etag(p Property) string {
	return `"` + tagValue(p.Version, p.RegionOrigin) + `"`
}

// tagValue is the inside of an entity tag, which SQL compares too (see
// updatePropertySQL).
func tagValue(version int64, region string) string {
	return strconv.FormatInt(version, 10) + "-" + region
}

// validTag reports whether s is a tagValue: a positive version, a dash and
// a region.
func validTag(s string) bool {
	v, region, ok := strings.Cut(s, "-")
	n, err := strconv.ParseInt(v, 10, 64)
	return ok && err == nil && n >= 1 && strconv.FormatInt(n, 10) == v && validRegion(region)
}

// preconditionFailedError is an If-Match that names another state than the
// current one, which it carries (for its ETag and version).
type preconditionFailedError struct {
	current Property
}

// Error says which state is current.
func (e *preconditionFailedError) Error() string {
	return fmt.Sprintf("precondition failed: current state is %s", etag(e.current))
}

// tagCondition is a parsed If-Match or If-None-Match header: "*" (any state
// at all), or a list of entity tags.
type tagCondition struct {
	any    bool
	strong []string // the tags' values, without quotes
	weak   []string // W/"…" tags' values, which only If-None-Match may use
}

// parseTagCondition parses the named header, and reports whether the
// request has it. A header that is neither "*" nor a list of entity tags
// (RFC 9110: W/ for a weak one, then any visible characters but a quote,
// quoted; a comma inside the quotes is part of the tag) is a
// *validationError.
func parseTagCondition(h http.Header, name string) (tagCondition, bool, error) {
	values := h.Values(name)
	if len(values) == 0 {
		return tagCondition{}, false, nil
	}
	bad := &validationError{name + ` must be * or a list of entity tags such as "4-us"`}
	var c tagCondition
	for _, v := range values {
		if strings.TrimSpace(v) == "*" {
			c.any = true
			continue
		}
		for rest := v; ; {
			// Empty list elements (", ,") are allowed, as in every HTTP list.
			rest = strings.TrimLeft(rest, " \t,")
			if rest == "" {
				break
			}
			weak := strings.HasPrefix(rest, "W/")
			inner, ok := strings.CutPrefix(strings.TrimPrefix(rest, "W/"), `"`)
			end := strings.IndexByte(inner, '"')
			if !ok || end < 0 || strings.IndexFunc(inner[:end], notTagChar) >= 0 {
				return tagCondition{}, true, bad
			}
			if weak {
				c.weak = append(c.weak, inner[:end])
			} else {
				c.strong = append(c.strong, inner[:end])
			}
			rest = strings.TrimLeft(inner[end+1:], " \t")
			if rest != "" && rest[0] != ',' {
				return tagCondition{}, true, bad
			}
		}
	}
	return c, true, nil
}

// notTagChar reports whether r may not appear inside an entity tag's quotes:
// only visible ASCII other than the quote, and bytes beyond ASCII, may.
func notTagChar(r rune) bool {
	return r != 0x21 && (r < 0x23 || r > 0x7e) && r < 0x80
}

// states is what a write's If-Match lets it apply to (updatePropertySQL's
// and deletePropertySQL's list of tag values): nil for "*", any state;
// otherwise the strong tags, by strong comparison, as a weak tag names no
// state here. Never nil then, so that a list with none left matches nothing.
func (c tagCondition) states() []string {
	if c.any {
		return nil
	}
	return append([]string{}, c.strong...)
}

// matchesStrong reports whether the condition names the state p by strong
// comparison, as If-Match requires.
func (c tagCondition) matchesStrong(p Property) bool {
	return c.any || slices.Contains(c.strong, tagValue(p.Version, p.RegionOrigin))
}

// matchesWeak reports whether the condition names the state p by weak
// comparison, as If-None-Match allows: a W/ tag counts as well.
func (c tagCondition) matchesWeak(p Property) bool {
	return c.matchesStrong(p) || slices.Contains(c.weak, tagValue(p.Version, p.RegionOrigin))
}
