package main

// Strict JSON: everything that arrives from outside the process, a client's
// request body or the other region's event, is decoded by strictUnmarshal
// and by nothing else, so that both sides of the service refuse the same
// things. A lenient decoder is a quiet way to accept a request nobody meant:
//
//   - encoding/json ignores a field it does not know: {"prise": 5} would
//     leave the price unset;
//   - it matches field names without regard to case: {"PRICE": 5} would set
//     the price;
//   - it keeps the last of a repeated key: "version":3,"version":7 would mean
//     7 to us and, to another parser, 3;
//   - it stops after the first value: {…}} would pass.
//
// So the names are checked first, exactly and once each, and then the value
// is decoded with unknown fields refused and nothing allowed after it.
//
// The HTTP side of it is here too: decode reads a request body within
// maxBodyBytes, decodeError says what was wrong with one, and encode writes
// every answer.

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"reflect"
	"strconv"
	"strings"
	"sync"
)

// errTrailingData is a document with more after its one JSON value: another
// value, or stray characters such as a second closing brace.
var errTrailingData = errors.New("trailing data after the JSON object")

// fieldError is a field name the rules refuse: one the type does not have
// (compared exactly, case included), or one given twice.
type fieldError struct {
	problem string // "unknown field" or "repeated field"
	name    string
}

// Error names the field, as the client wrote it.
func (e *fieldError) Error() string { return fmt.Sprintf("%s %q", e.problem, e.name) }

// strictUnmarshal decodes b, which must hold exactly one JSON value, into v,
// a pointer to a struct. A field name that is not exactly one of v's, or
// that an object repeats, is a *fieldError; anything after the value but
// white space is errTrailingData. Other errors are encoding/json's.
func strictUnmarshal(b []byte, v any) error {
	if err := checkNames(b, fieldNames(reflect.TypeOf(v).Elem())); err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	// Token, unlike More, reports a stray "}" or "]" as data: only the end
	// of the input will do.
	if _, err := dec.Token(); err != io.EOF {
		return errTrailingData
	}
	return nil
}

// checkNames walks b's tokens and returns a *fieldError for the first key
// that an object repeats, or that the top-level object has but names does
// not. Malformed JSON is left for the decoder to report.
func checkNames(b []byte, names map[string]bool) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	// One frame per open object or array: an object's keys so far, and
	// whether its next string is a key.
	type frame struct {
		keys    map[string]bool
		wantKey bool
	}
	var stack []*frame
	for {
		tok, err := dec.Token()
		if err != nil {
			return nil // the end, or malformed: the decoder says which
		}
		var top *frame
		if len(stack) > 0 {
			top = stack[len(stack)-1]
		}
		if key, ok := tok.(string); ok && top != nil && top.wantKey {
			if top.keys[key] {
				return &fieldError{"repeated field", key}
			}
			if len(stack) == 1 && !names[key] {
				return &fieldError{"unknown field", key}
			}
			top.keys[key] = true
			top.wantKey = false
			continue
		}
		switch tok {
		case json.Delim('{'):
			stack = append(stack, &frame{keys: map[string]bool{}, wantKey: true})
			continue
		case json.Delim('['):
			stack = append(stack, &frame{})
			continue
		case json.Delim('}'), json.Delim(']'):
			stack = stack[:len(stack)-1]
			if len(stack) == 0 {
				return nil
			}
			top = stack[len(stack)-1]
		}
		// A value ended: the enclosing object's next string is a key.
		if top != nil && top.keys != nil {
			top.wantKey = true
		}
	}
}

// fieldNamesCache holds fieldNames' answer per type.
var fieldNamesCache sync.Map // reflect.Type → map[string]bool

// fieldNames returns the JSON names of struct type t's fields, as
// encoding/json names them: the tag's name, else the Go name, with the
// fields of an embedded struct promoted.
func fieldNames(t reflect.Type) map[string]bool {
	if names, ok := fieldNamesCache.Load(t); ok {
		return names.(map[string]bool)
	}
	names := map[string]bool{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-" || !f.IsExported() && !f.Anonymous:
		case f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct:
			for n := range fieldNames(f.Type) {
				names[n] = true
			}
		case name == "":
			names[f.Name] = true
		default:
			names[name] = true
		}
	}
	fieldNamesCache.Store(t, names)
	return names
}

// wholeInt32 and wholeInt64 are the integer fields of request bodies. They
// read any JSON number whose value is a whole number in range: 3, 3.0 and
// 3e0 alike, as JSON Schema's "integer" (and so the API document) reads
// them. encoding/json alone refuses 3.0 for an integer.
type (
	wholeInt32 int32
	wholeInt64 int64
)

// UnmarshalJSON reads a whole number that fits 32 bits.
func (n *wholeInt32) UnmarshalJSON(b []byte) error {
	v, err := parseWhole(b, reflect.TypeFor[int32](), math.MinInt32, math.MaxInt32)
	*n = wholeInt32(v)
	return err
}

// UnmarshalJSON reads a whole number that fits 64 bits.
func (n *wholeInt64) UnmarshalJSON(b []byte) error {
	v, err := parseWhole(b, reflect.TypeFor[int64](), math.MinInt64, math.MaxInt64)
	*n = wholeInt64(v)
	return err
}

// maxExactFloat is the magnitude below which every whole number has
// an exact float64: a number written with a fraction or an exponent is
// accepted only up to it.
const maxExactFloat = 1 << 53

// parseWhole reads the JSON value b as a whole number in [lo, hi]. Anything
// else (a string, a fraction, out of range) is the *json.UnmarshalTypeError
// that encoding/json gives for an integer field, which names the field.
func parseWhole(b []byte, t reflect.Type, lo, hi int64) (int64, error) {
	s := string(b)
	if v, err := strconv.ParseInt(s, 10, 64); err == nil && v >= lo && v <= hi {
		return v, nil
	}
	wrong := &json.UnmarshalTypeError{Value: "number " + s, Type: t}
	if s == "" || s[0] != '-' && (s[0] < '0' || s[0] > '9') {
		wrong.Value = "non-number"
		return 0, wrong
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f != math.Trunc(f) || math.Abs(f) >= maxExactFloat || int64(f) < lo || int64(f) > hi {
		return 0, wrong
	}
	return int64(f), nil
}

// encode writes v as the JSON response with the given status. Headers must be
// set before WriteHeader, so the content type goes first.
func encode[T any](w http.ResponseWriter, status int, v T) {
	w.Header().Set("Content-Type", "application/json")
	if status >= 400 {
		// An error tells of a moment, not of the resource: no cache may
		// keep it and answer it again.
		w.Header().Set("Cache-Control", "no-store")
	}
	w.WriteHeader(status)
	// An error here means the client went away; there is nobody to tell.
	_ = json.NewEncoder(w).Encode(v)
}

// maxDrainBytes bounds how much of a body over maxBodyBytes the server reads
// and throws away before it answers 413.
const maxDrainBytes = 1 << 20

// decode reads a request body of at most maxBodyBytes holding exactly one JSON
// object with only the fields of T (strictUnmarshal). Every failure is a
// *validationError or an *http.MaxBytesError, with a message fit for the
// client.
func decode[T any](w http.ResponseWriter, r *http.Request) (T, error) {
	var v T
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			// The server closes the connection after the 413, and a socket
			// closed with unread data in it is reset: a client still sending
			// its body would see the reset, not the answer. So the rest of the
			// body is read first, up to maxDrainBytes more.
			io.CopyN(io.Discard, r.Body, maxDrainBytes)
			return v, tooLarge
		}
		return v, &validationError{"could not read the request body"}
	}
	if !bytes.HasPrefix(bytes.TrimLeft(body, " \t\r\n"), []byte("{")) {
		return v, &validationError{"body must be one JSON object"}
	}
	if err := strictUnmarshal(body, &v); err != nil {
		return v, decodeError(err)
	}
	return v, nil
}

// noBody reads a request that must have no body, such as a DELETE, and
// returns a *validationError if it has one (or an *http.MaxBytesError if it
// is too large to read).
func noBody(w http.ResponseWriter, r *http.Request) error {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBodyBytes))
	var tooLarge *http.MaxBytesError
	switch {
	case errors.As(err, &tooLarge):
		io.CopyN(io.Discard, r.Body, maxDrainBytes)
		return tooLarge
	case err != nil:
		return &validationError{"could not read the request body"}
	case len(body) > 0:
		return &validationError{r.Method + " takes no body"}
	}
	return nil
}

// decodeError turns an encoding/json error into a message that names the
// problem in the client's terms, without Go type names.
func decodeError(err error) error {
	var (
		verr      *validationError
		fieldErr  *fieldError
		typeErr   *json.UnmarshalTypeError
		syntaxErr *json.SyntaxError
	)
	switch {
	case errors.As(err, &verr):
		return verr
	case errors.Is(err, errTrailingData):
		return &validationError{"body must be one JSON object with nothing after it"}
	case errors.As(err, &fieldErr):
		return &validationError{fieldErr.Error()}
	case errors.As(err, &typeErr):
		want := "a JSON object"
		switch typeErr.Type.Kind() {
		case reflect.Int32, reflect.Int64:
			want = "an integer in range"
		}
		if typeErr.Field == "" {
			return &validationError{"body must be one JSON object"}
		}
		return &validationError{fmt.Sprintf("%s must be %s", typeErr.Field, want)}
	case errors.As(err, &syntaxErr), errors.Is(err, io.ErrUnexpectedEOF):
		return &validationError{"body is not valid JSON"}
	case strings.HasPrefix(err.Error(), "json: unknown field "):
		return &validationError{"unknown field " + strings.TrimPrefix(err.Error(), "json: unknown field ")}
	}
	return &validationError{"body is not valid JSON"}
}
