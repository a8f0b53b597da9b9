package main

import (
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/twmb/franz-go/pkg/kgo"
)

func TestDecodeMessage(t *testing.T) {
	good := `{"id":7,"price":100.5,"bedrooms":2,"bathrooms":1,"region_origin":"us","version":2,"updated_at":"2026-03-01T12:00:00.123456Z","request_id":"r-1"}`
	fingerprint := requestFingerprint("PUT", "/properties/7", updateRequest{Price: ptr(Money(100_50)), Version: ptr(wholeInt64(1))})
	headers := func(kind, region string) []kgo.RecordHeader {
		return append(recordHeaders(kind, region), kgo.RecordHeader{Key: headerFingerprint, Value: []byte(fingerprint)})
	}
	tests := []struct {
		name    string
		rec     *kgo.Record
		wantErr string
	}{
		{"event", &kgo.Record{Key: []byte("7"), Value: []byte(good), Headers: headers("event", "us")}, ""},
		{"heartbeat", &kgo.Record{Value: []byte(`{"region":"eu","watermark":"2026-03-01T12:00:00Z"}`), Headers: headers("heartbeat", "eu")}, ""},
		{"not_json", &kgo.Record{Key: []byte("7"), Value: []byte(`not json {`), Headers: headers("event", "us")},
			"event: invalid character 'o' in literal null (expecting 'u')"},
		{"no_headers", &kgo.Record{Key: []byte("7"), Value: []byte(good)}, `missing or unknown "region" header ""`},
		{"unknown_kind", &kgo.Record{Key: []byte("7"), Value: []byte(good), Headers: headers("delete", "us")}, `missing or unknown "kind" header "delete"`},
		{"unknown_field", &kgo.Record{Key: []byte("7"), Value: []byte(`{"id":7,"color":"red"}`), Headers: headers("event", "us")},
			`event: unknown field "color"`},
		{"price_with_three_decimals", &kgo.Record{Key: []byte("7"), Value: []byte(`{"id":7,"price":1.001,"region_origin":"us","version":2,"updated_at":"2026-03-01T12:00:00Z","request_id":"r"}`), Headers: headers("event", "us")},
			"event: price must have at most two decimal places"},
		{"version_zero", &kgo.Record{Key: []byte("7"), Value: []byte(`{"id":7,"price":1,"region_origin":"us","version":0,"updated_at":"2026-03-01T12:00:00Z","request_id":"r"}`), Headers: headers("event", "us")},
			"event: version must be positive"},
		{"region_mismatch", &kgo.Record{Key: []byte("7"), Value: []byte(good), Headers: headers("event", "eu")},
			`event: region_origin "us" differs from header "eu"`},
		{"key_mismatch", &kgo.Record{Key: []byte("8"), Value: []byte(good), Headers: headers("event", "us")},
			`event: key "8" is not the property id 7`},
		{"field_name_case", &kgo.Record{Key: []byte("7"), Value: []byte(`{"ID":7,"price":1,"region_origin":"us","version":2,"updated_at":"2026-03-01T12:00:00Z","request_id":"r"}`), Headers: headers("event", "us")},
			`event: unknown field "ID"`},
		{"repeated_key", &kgo.Record{Key: []byte("7"), Value: []byte(`{"id":7,"price":1,"region_origin":"us","version":2,"version":9,"updated_at":"2026-03-01T12:00:00Z","request_id":"r"}`), Headers: headers("event", "us")},
			`event: repeated field "version"`},
		{"fingerprint_missing", &kgo.Record{Key: []byte("7"), Value: []byte(good), Headers: recordHeaders("event", "us")},
			`event: missing or invalid "request-fingerprint" header`},
		{"trailing_data", &kgo.Record{Key: []byte("7"), Value: []byte(good + `{}`), Headers: headers("event", "us")},
			"event: trailing data after the JSON object"},
		{"heartbeat_without_watermark", &kgo.Record{Value: []byte(`{"region":"eu"}`), Headers: headers("heartbeat", "eu")},
			"heartbeat: region or watermark missing"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := decodeMessage(tt.rec)
			gotErr := ""
			if err != nil {
				gotErr = err.Error()
			}
			if gotErr != tt.wantErr {
				t.Errorf("decodeMessage(%s) error = %q, want %q", tt.rec.Value, gotErr, tt.wantErr)
			}
		})
	}
}

// FuzzDecodeMessage feeds any value, key and headers to the consumer's
// decoder: it never panics, and an event it accepts is valid and survives
// a trip through the relay's encoding unchanged.
func FuzzDecodeMessage(f *testing.F) {
	fingerprint := requestFingerprint("PUT", "/properties/7", nil)
	good := `{"id":7,"price":100.5,"bedrooms":2,"bathrooms":1,"region_origin":"us","version":2,"updated_at":"2026-03-01T12:00:00.123456Z","request_id":"r-1"}`
	f.Add([]byte("7"), []byte(good), "event", "us", fingerprint)
	f.Add([]byte("7"), []byte(`{"id":7,"price":1,"bedrooms":null,"bathrooms":null,"region_origin":"us","version":3,"updated_at":"2026-03-01T12:00:00Z","deleted":true,"request_id":"r"}`), "event", "us", fingerprint)
	f.Add([]byte(nil), []byte(`{"region":"eu","watermark":"2026-03-01T12:00:00Z"}`), "heartbeat", "eu", "")
	f.Add([]byte("7"), []byte(`{"id":7,"price":1e400}`), "event", "us", fingerprint)
	f.Add([]byte("x"), []byte(`null`), "delete", "mars", "zz")
	f.Fuzz(func(t *testing.T, key, value []byte, kind, region, fp string) {
		rec := &kgo.Record{Key: key, Value: value, Headers: append(recordHeaders(kind, region), kgo.RecordHeader{Key: headerFingerprint, Value: []byte(fp)})}
		m, err := decodeMessage(rec)
		if err != nil || m.event == nil {
			return
		}
		if err := m.event.validate(); err != nil {
			t.Fatalf("accepted an invalid event %+v: %v", m.event, err)
		}
		again, err := eventRecord("t", *m.event)
		if err != nil {
			t.Fatal(err)
		}
		m2, err := decodeMessage(again)
		if err != nil || m2.event == nil || !cmp.Equal(*m.event, *m2.event, cmp.AllowUnexported(event{})) {
			t.Fatalf("event %+v does not survive re-encoding: %+v, %v", m.event, m2.event, err)
		}
	})
}
