// Writes the raw records of a Kafka topic as fuzz inputs of BitClone9's avro_decode target:
// one file per record, [key length][key][value]. Records whose key is longer than 255 bytes are
// left out.
//
//   java DumpRecords BOOTSTRAP TOPIC MAX OUTDIR
package dev.bitclone9.console;

import java.io.ByteArrayOutputStream;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.List;
import java.util.Properties;
import java.util.stream.Collectors;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

public final class DumpRecords {
  public static void main(String[] args) throws Exception {
    Properties p = new Properties();
    p.put("bootstrap.servers", args[0]);
    p.put("key.deserializer", ByteArrayDeserializer.class.getName());
    p.put("value.deserializer", ByteArrayDeserializer.class.getName());
    p.put("enable.auto.commit", "false");
    int max = Integer.parseInt(args[2]);
    Path out = Path.of(args[3]);
    Files.createDirectories(out);
    try (KafkaConsumer<byte[], byte[]> c = new KafkaConsumer<>(p)) {
      List<TopicPartition> parts = c.partitionsFor(args[1]).stream()
          .map(i -> new TopicPartition(i.topic(), i.partition()))
          .collect(Collectors.toList());
      c.assign(parts);
      c.seekToBeginning(parts);
      int n = 0;
      int idle = 0;
      while (n < max && idle < 3) {
        var records = c.poll(Duration.ofSeconds(1));
        idle = records.isEmpty() ? idle + 1 : 0;
        for (ConsumerRecord<byte[], byte[]> r : records) {
          byte[] k = r.key() == null ? new byte[0] : r.key();
          byte[] v = r.value() == null ? new byte[0] : r.value();
          if (k.length > 255 || n >= max) continue;
          ByteArrayOutputStream b = new ByteArrayOutputStream();
          b.write(k.length);
          b.write(k);
          b.write(v);
          Files.write(out.resolve(r.topic() + "-" + r.partition() + "-" + r.offset()), b.toByteArray());
          n++;
        }
      }
      System.out.println(n);
    }
  }
}
