package dev.bitclone9.console;

import io.apicurio.registry.serde.avro.AvroKafkaDeserializer;
import org.apache.kafka.common.header.Headers;

/**
 * Kafka's console consumer hands a null key or value (a truncate's key, a tombstone's value) to
 * the deserializer as the four bytes "null" and prints what it returns with toString(); this
 * returns the text null for it instead of failing.
 */
public class NullSafeAvroDeserializer extends AvroKafkaDeserializer<Object> {
    private static boolean isNullLiteral(byte[] data) {
        return data == null || (data.length == 4 && data[0] == 'n' && data[1] == 'u' && data[2] == 'l' && data[3] == 'l');
    }

    @Override
    public Object deserialize(String topic, byte[] data) {
        return isNullLiteral(data) ? "null" : super.deserialize(topic, data);
    }

    @Override
    public Object deserialize(String topic, Headers headers, byte[] data) {
        return isNullLiteral(data) ? "null" : super.deserialize(topic, headers, data);
    }
}
