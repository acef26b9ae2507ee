// A DataStream job the test submits to the local Flink cluster: the sum of
// 2 * (1..N) computed by the TaskManager's slots, printed by the client.
import org.apache.flink.api.common.functions.MapFunction;
import org.apache.flink.streaming.api.environment.StreamExecutionEnvironment;
import org.apache.flink.util.CloseableIterator;

public class FlinkSum {
  public static void main(String[] args) throws Exception {
    // args: REST host, REST port, this job's jar (shipped to the TaskManager), N
    StreamExecutionEnvironment env =
        StreamExecutionEnvironment.createRemoteEnvironment(
            args[0], Integer.parseInt(args[1]), args[2]);
    env.setParallelism(2);
    long sum = 0;
    try (CloseableIterator<Long> doubled =
        env.fromSequence(1, Long.parseLong(args[3]))
            .map(
                new MapFunction<Long, Long>() {
                  @Override
                  public Long map(Long x) {
                    return 2 * x;
                  }
                })
            .executeAndCollect()) {
      while (doubled.hasNext()) {
        sum += doubled.next();
      }
    }
    System.out.println("sum=" + sum);
  }
}
