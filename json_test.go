package main

import (
	"errors"
	"testing"
)

func TestStrictUnmarshal(t *testing.T) {
	type object struct {
		Price   int `json:"price"`
		Version int `json:"version"`
	}
	tests := []struct {
		name    string
		in      string
		wantErr error // nil, errTrailingData, errField, or errAny for encoding/json's own
	}{
		{"one_object", `{"price": 5, "version": 1}`, nil},
		{"white_space_around", " \n{\"price\": 5}\t\r\n", nil},
		{"second_object", `{"price": 5} {}`, errTrailingData},
		{"extra_closing_brace", `{"price": 5}}`, errTrailingData},
		{"extra_closing_bracket", `{"price": 5}]`, errTrailingData},
		{"trailing_garbage", `{"price": 5}x`, errTrailingData},
		{"unknown_field", `{"price": 5, "colour": "red"}`, errField},
		{"name_in_other_case", `{"PRICE": 5, "version": 1}`, errField},
		{"repeated_key", `{"price": 5, "version": 3, "version": 7}`, errField},
		{"repeated_key_nested", `{"price": {"a": 1, "a": 2}}`, errField},
		{"truncated", `{"price": 5`, errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var v object
			err := strictUnmarshal([]byte(tt.in), &v)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Errorf("strictUnmarshal(%q) = %v, want success", tt.in, err)
			case tt.wantErr == errAny && err == nil:
				t.Errorf("strictUnmarshal(%q) succeeded, want an error", tt.in)
			case tt.wantErr == errField && !errors.As(err, new(*fieldError)):
				t.Errorf("strictUnmarshal(%q) = %v, want a *fieldError", tt.in, err)
			case tt.wantErr == errTrailingData && !errors.Is(err, errTrailingData):
				t.Errorf("strictUnmarshal(%q) = %v, want %v", tt.in, err, errTrailingData)
			}
		})
	}
}

// errAny and errField stand for any error and for any *fieldError in a test
// table.
var (
	errAny   = errors.New("any error")
	errField = errors.New("a *fieldError")
)

// FuzzDecodeBody feeds any bytes to the PUT and POST decoders: they never
// panic, and every body they accept validates to a write that obeys the
// rules, or is refused with a *validationError for the client.
func FuzzDecodeBody(f *testing.F) {
	for _, s := range []string{`{"price": 1, "version": 1}`, `{"price": 450000.5, "version": 3, "bedrooms": 2, "bathrooms": null}`,
		`{"price": 1}`, `{"Price": 1}`, `{"price": 1, "price": 2}`, `{"price": 1}}`, `[]`, `{"price": "1"}`, `{"price": 1e400}`,
		`{"price": 1, "version": 9223372036854775808}`, `{"price": 1, "bedrooms": -1}`, "{\"price\": 1, \"\\u0070rice\": 2}", ``} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		var u updateRequest
		if err := strictUnmarshal(body, &u); err == nil {
			if w, err := u.validate(); err == nil {
				if checkValues(w.Price, w.Bedrooms, w.Bathrooms) != nil || w.Version < 1 {
					t.Fatalf("%q: accepted an update that breaks the rules: %+v", body, w)
				}
			} else if _, ok := err.(*validationError); !ok {
				t.Fatalf("%q: validate returned %T %v, want a *validationError", body, err, err)
			}
		} else if _, ok := decodeError(err).(*validationError); !ok {
			t.Fatalf("%q: decodeError gives %T", body, decodeError(err))
		}
		var c createRequest
		if err := strictUnmarshal(body, &c); err == nil {
			if n, err := c.validate(); err == nil && checkValues(n.Price, &n.Bedrooms, &n.Bathrooms) != nil {
				t.Fatalf("%q: accepted a create that breaks the rules: %+v", body, n)
			}
		}
	})
}

// TestWholeNumbers: an integer field reads a whole number however JSON
// writes it, and refuses anything else with the decoder's own error, which
// names the field.
func TestWholeNumbers(t *testing.T) {
	for _, tt := range []struct {
		body    string
		want    int64
		wantErr string
	}{
		{`{"version": 3}`, 3, ""},
		{`{"version": 3.0}`, 3, ""},
		{`{"version": 3e0}`, 3, ""},
		{`{"version": 0.3e1}`, 3, ""},
		{`{"version": 9223372036854775807}`, 9223372036854775807, ""},
		{`{"version": 9007199254740991.0}`, 9007199254740991, ""},
		{`{"version": 9007199254740993.0}`, 0, "version must be an integer in range"},
		{`{"version": 3.5}`, 0, "version must be an integer in range"},
		{`{"version": 1e400}`, 0, "version must be an integer in range"},
		{`{"version": "3"}`, 0, "version must be an integer in range"},
		{`{"version": true}`, 0, "version must be an integer in range"},
		{`{"bedrooms": 2147483648}`, 0, "bedrooms must be an integer in range"},
		{`{"bedrooms": 2.0}`, 0, ""},
	} {
		var req updateRequest
		err := strictUnmarshal([]byte(tt.body), &req)
		gotErr := ""
		if err != nil {
			gotErr = decodeError(err).Error()
		}
		if gotErr != tt.wantErr || err == nil && req.Version != nil && int64(*req.Version) != tt.want {
			t.Errorf("%s: version %v, error %q; want %d, %q", tt.body, req.Version, gotErr, tt.want, tt.wantErr)
		}
	}
}
