// A job the test submits to the local Spark cluster: the sum of 2 * (1..N)
// computed by an executor the worker starts, printed by the driver.
import java.util.ArrayList;
import java.util.List;
import org.apache.spark.SparkConf;
import org.apache.spark.api.java.JavaSparkContext;

public class SparkSum {
  public static void main(String[] args) {
    // args: master URL, this job's jar (shipped to the executors), N
    SparkConf conf =
        new SparkConf()
            .setAppName("SparkSum")
            .setMaster(args[0])
            .setJars(new String[] {args[1]})
            .set("spark.driver.host", "127.0.0.1")
            .set("spark.driver.bindAddress", "127.0.0.1")
            .set("spark.ui.enabled", "false");
    List<Long> numbers = new ArrayList<>();
    for (long i = 1; i <= Long.parseLong(args[2]); i++) {
      numbers.add(i);
    }
    try (JavaSparkContext context = new JavaSparkContext(conf)) {
      long sum = context.parallelize(numbers, 2).map(x -> 2 * x).reduce(Long::sum);
      System.out.println("sum=" + sum);
    }
  }
}
