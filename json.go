package main

// Strict JSON: everything that arrives from outside the process, a client's
// request body or the other region's event, is decoded by strictUnmarshal
// and by nothing else, so that both sides of the service refuse the same
// things. A lenient decoder is a quiet way to accept a request nobody meant:
// a field the service does not know is ignored, a second object after the
// first is never read.

import (
	"bytes"
	"encoding/json"
	"errors"
	"io"
)

// errTrailingData is a document with more after its one JSON value: another
// value, or stray characters such as a second closing brace.
var errTrailingData = errors.New("trailing data after the JSON object")

// strictUnmarshal decodes b, which must hold exactly one JSON value, into v.
// A field that v does not have is an error, and so is anything after the
// value but white space (errTrailingData). Other errors are encoding/json's.
func strictUnmarshal(b []byte, v any) error {
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
