package main

import (
	"encoding/json"
	"testing"
)

func TestParseMoney(t *testing.T) {
	tests := []struct {
		in      string
		want    Money
		wantErr string
	}{
		{"450000.5", 45_000_050, ""},
		{"450000.50", 45_000_050, ""},
		{"0.01", 1, ""},
		{"1", 100, ""},
		{"1e3", 100_000, ""},
		{"1.5E+2", 15_000, ""},
		{"12345e-2", 12_345, ""},
		{"1.230", 123, ""},
		{"9999999999.99", 999_999_999_999, ""},
		{"0.001", 0, "price must have at most two decimal places"},
		{"1.005", 0, "price must have at most two decimal places"},
		{"0", 0, "price must be greater than 0"},
		{"0.00", 0, "price must be greater than 0"},
		{"-1", 0, "price must be greater than 0"},
		{"0e999999", 0, "price is out of range"},
		{"10000000000", 0, "price must be less than 10000000000"},
		{"1e12", 0, "price must be less than 10000000000"},
		{"99999999999999999999999", 0, "price must be less than 10000000000"},
		{"1e-200", 0, "price is out of range"},
	}
	for _, tt := range tests {
		got, err := parseMoney(tt.in)
		gotErr := ""
		if err != nil {
			gotErr = err.Error()
		}
		if got != tt.want || gotErr != tt.wantErr {
			t.Errorf("parseMoney(%q) = %d, %q; want %d, %q", tt.in, got, gotErr, tt.want, tt.wantErr)
		}
	}
}

func TestMoneyJSON(t *testing.T) {
	tests := []struct {
		m    Money
		want string
	}{
		{45_000_050, "450000.5"},
		{45_000_000, "450000"},
		{1, "0.01"},
		{10, "0.1"},
		{999_999_999_999, "9999999999.99"},
	}
	for _, tt := range tests {
		got, err := json.Marshal(tt.m)
		if err != nil || string(got) != tt.want {
			t.Errorf("json.Marshal(Money(%d)) = %s, %v; want %s", tt.m, got, err, tt.want)
		}
		var back Money
		if err := json.Unmarshal(got, &back); err != nil || back != tt.m {
			t.Errorf("json.Unmarshal(%s) = %d, %v; want %d", got, back, err, tt.m)
		}
	}
}

// FuzzParseMoney: whatever the text, parseMoney either refuses it or gives a
// Money that prints as text which parses back to the same Money, and JSON
// agrees with it.
func FuzzParseMoney(f *testing.F) {
	for _, s := range []string{"0", "1", "450000.5", "450000.50", "0.01", "0.001", "1e3", "1.001e3", "-1", "9999999999.99",
		"10000000000", "1e400", "00.10", ".5", "5.", "1e-2", "1E+2", "NaN", "", " 1", "1_000", "0x10"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		m, err := parseMoney(s)
		if err != nil {
			return
		}
		again, err := parseMoney(m.String())
		if err != nil || again != m {
			t.Fatalf("parseMoney(%q) = %v, but its String %q parses to %v, %v", s, m, m.String(), again, err)
		}
		var fromJSON Money
		if err := fromJSON.UnmarshalJSON([]byte(m.String())); err != nil || fromJSON != m {
			t.Fatalf("Money %v from %q: JSON %q reads back as %v, %v", m, s, m.String(), fromJSON, err)
		}
	})
}
