//go:build integration

package main

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// TestTopicReplication: the backends created the topics the way the stack's
// topology asks (STACK_TOPOLOGY): on one broker, one replica; on three
// brokers, three replicas of every partition, and min.insync.replicas 2, so
// that an acknowledged event is on two brokers and survives the loss of one.
func TestTopicReplication(t *testing.T) {
	newStack(t)
	replicas, insync := 1, 1
	if setting("STACK_TOPOLOGY", "single") == "ha" {
		replicas, insync = 3, 2
	}
	kafka := kafkaAdmin(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	topic := setting("KAFKA_TOPIC", "property-updates")
	for _, name := range []string{topic, topic + ".dlq"} {
		meta := kmsg.NewPtrMetadataRequest()
		mt := kmsg.NewMetadataRequestTopic()
		mt.Topic = kmsg.StringPtr(name)
		meta.Topics = append(meta.Topics, mt)
		resp, err := meta.RequestWith(ctx, kafka)
		if err != nil {
			t.Fatalf("metadata of %s: %v", name, err)
		}
		for _, tp := range resp.Topics {
			if err := kerr.ErrorForCode(tp.ErrorCode); err != nil || len(tp.Partitions) == 0 {
				t.Fatalf("metadata of %s: %v, %d partitions", name, err, len(tp.Partitions))
			}
			for _, p := range tp.Partitions {
				if len(p.Replicas) != replicas || len(p.ISR) != replicas {
					t.Errorf("%s partition %d: replicas %v, in sync %v; want %d of each", name, p.Partition, p.Replicas, p.ISR, replicas)
				}
			}
		}

		req := kmsg.NewPtrDescribeConfigsRequest()
		res := kmsg.NewDescribeConfigsRequestResource()
		res.ResourceType = kmsg.ConfigResourceTypeTopic
		res.ResourceName = name
		res.ConfigNames = []string{"min.insync.replicas"}
		req.Resources = append(req.Resources, res)
		cresp, err := req.RequestWith(ctx, kafka)
		if err != nil || len(cresp.Resources) != 1 || len(cresp.Resources[0].Configs) != 1 {
			t.Fatalf("min.insync.replicas of %s: %v, %+v", name, err, cresp)
		}
		if got := cresp.Resources[0].Configs[0].Value; got == nil || *got != strconv.Itoa(insync) {
			t.Errorf("%s: min.insync.replicas = %v, want %d", name, got, insync)
		}
	}
}
